"""Rewards computed on generated images (against target / source images); see README.md in this folder.

Importing the package registers every built-in reward: lpips, ssim, text, aesthetic, aesthetic_heuristic,
structure, remote. Build the AR and DiT sets from a config with `build_reward_sets`.
"""

from glm_jax.rewards import aesthetic, lpips, ocr, remote, ssim, structure  # noqa: F401  (registration)
from glm_jax.rewards.base import (
    REGISTRY,
    CombinedResult,
    Reward,
    RewardContext,
    RewardError,
    RewardResult,
    RewardSet,
    build_reward_sets,
    combine,
    make_reward,
    register,
)

__all__ = [
    "REGISTRY", "CombinedResult", "Reward", "RewardContext", "RewardError", "RewardResult", "RewardSet",
    "build_reward_sets", "combine", "make_reward", "register",
]
