"""GRPO math of glm_jax: advantages (`advantages`) and the AR / DiT policy losses with their KL terms (`losses`).

Pure functions over arrays (rewards, log-probs, transition means), independent of the models; see README.md.
"""

from glm_jax.grpo.advantages import (
    AGGREGATIONS,
    SCALES,
    Advantages,
    compute_advantages,
    group_advantages_jnp,
    parent_mean,
)
from glm_jax.grpo.losses import (
    IS_LEVELS,
    LOSS_TYPES,
    ArNorm,
    DitKL,
    DitNorm,
    ar_loss_normalizers,
    ar_policy_loss,
    dit_kl,
    dit_loss_normalizers,
    dit_policy_loss,
    k3,
    velocity_mse,
    vocab_kl,
)

__all__ = [
    "AGGREGATIONS", "IS_LEVELS", "LOSS_TYPES", "SCALES", "Advantages", "ArNorm", "DitKL", "DitNorm",
    "ar_loss_normalizers", "ar_policy_loss", "compute_advantages", "dit_kl", "dit_loss_normalizers",
    "dit_policy_loss", "group_advantages_jnp", "k3", "parent_mean", "velocity_mse", "vocab_kl",
]
