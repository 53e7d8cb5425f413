"""Rematerialisation (activation checkpointing) policies, selectable by name in configs.

    none            keep every activation (fastest, most memory)
    full            recompute each layer's activations in the backward pass (least memory)
    dots            keep the outputs of matmuls without batch dimensions (the projections), recompute the rest
    dots_attention  `dots`, and also keep the outputs of the fused (cuDNN) attention: its output and softmax
                    statistics, which its backward pass reads; only elementwise work is recomputed
    dots_all        keep every matmul output (also attention scores), recompute elementwise work only

`dots_attention` costs, per layer, one attention output (`[batch, tokens, heads * head_dim]` in the compute dtype)
and its float32 statistics (`[batch, heads, tokens]`) more than `dots`, and saves the attention forward that
`dots` runs again in the backward pass: for the real-size DiT at 1024² (30 layers, 4352 tokens, batch 1) 0.96 GiB
more temporaries for 16-19 ms less of a 0.36-0.37 s step on an H100 (benchmarks/RESULTS.md). With XLA's
attention (no fused primitive: CPU, or `attention="xla"`) it is the same as `dots`.
"""

from __future__ import annotations

import jax
from flax import nnx

# the primitive of `jax.nn.dot_product_attention(implementation="cudnn")`'s forward pass in training (its outputs:
# the attention output and the softmax statistics); tests/test_remat.py checks that the name still matches
FUSED_ATTENTION_PRIMITIVES = frozenset({"dot_product_attention_fwd_wrapper"})


def dots_and_attention_saveable(prim, *avals, **params) -> bool:
    """`jax.checkpoint` policy: the outputs of unbatched matmuls and of the fused attention's forward are saved."""
    return (prim.name in FUSED_ATTENTION_PRIMITIVES
            or jax.checkpoint_policies.dots_with_no_batch_dims_saveable(prim, *avals, **params))


REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "dots_attention": dots_and_attention_saveable,
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
