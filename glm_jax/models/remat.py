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
    """Calls `layer(*args)`, rematerialised with the named policy unless it is "none".

    `static_argnums` index into `args` (strings, flags). The layer is split into its graph and state and the
    pure `merge(graph, state)(*args)` goes through `jax.checkpoint` (layers hold no mutable state, so nothing is
    written back). Unlike `nnx.remat`, this works when the layer's variables come from different traces, e.g.
    LoRA adapters being differentiated next to frozen base kernels."""
    if policy == "none":
        return layer(*args)
    graphdef, state = nnx.split(layer)

    def pure(st, *a):
        return nnx.merge(graphdef, st)(*a)
    fn = jax.checkpoint(pure, policy=REMAT_POLICIES[policy], prevent_cse=True,
                        static_argnums=tuple(i + 1 for i in static_argnums))
    return fn(state, *args)
