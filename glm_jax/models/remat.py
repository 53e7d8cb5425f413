"""Rematerialisation (activation checkpointing) policies, selectable by name in configs.

    none      keep every activation (fastest, most memory)
    full      recompute each layer's activations in the backward pass (least memory)
    dots      keep the outputs of matmuls without batch dimensions (the projections), recompute the rest
    dots_all  keep every matmul output (also attention scores), recompute elementwise work only
"""

from __future__ import annotations

import jax
from flax import nnx

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "dots_all": jax.checkpoint_policies.dots_saveable,
}


def check_policy(name: str) -> str:
    if name not in REMAT_POLICIES:
        raise ValueError(f"remat policy {name!r} is not one of {sorted(REMAT_POLICIES)}")
    return name


def layer_call(layer: nnx.Module, policy: str, *args, static_argnums: tuple[int, ...] = ()):
    """Calls `layer(*args)`, under `nnx.remat` with the named policy unless it is "none".

    `static_argnums` index into `args` (strings, flags)."""
    if policy == "none":
        return layer(*args)
    fn = nnx.remat(lambda lyr, *a: lyr(*a), policy=REMAT_POLICIES[policy], prevent_cse=True,
                   static_argnums=tuple(i + 1 for i in static_argnums))
    return fn(layer, *args)
