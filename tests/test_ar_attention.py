"""The attention of the AR's teacher-forced (training) pass: `model.attention` reaches it through
`pipeline.set_ar_train_attention`, and only it; the rollouts' prefill and one-token steps keep their own path.

With XLA's attention the update materialises float32 scores `[B, heads, L, L]` per layer (≈230 MB per 1024²
sequence and layer at real size); cuDNN's flash attention does not (`benchmarks/RESULTS.md`, AR LoRA on one GPU).
Without a GPU the cuDNN checks are bypassed for tracing only (`tests.test_remat.cudnn_tracing`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from glm_jax.models.ar import ArConfig, GlmImageAR
from glm_jax.models.remat import FUSED_ATTENTION_PRIMITIVES
from glm_jax.pipeline import GlmImageStack, set_ar_train_attention
from glm_jax.tiny import tiny_ar_config
from tests.test_remat import cudnn_tracing

B, L = 2, 16


def tiny_ar(param_dtype=jnp.bfloat16) -> GlmImageAR:
    return GlmImageAR(ArConfig.from_hf(tiny_ar_config()), dtype=jnp.bfloat16, param_dtype=param_dtype,
                      rngs=nnx.Rngs(0))


def inputs():
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, 100, (B, L)), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (3, B, L))
    mask = jnp.ones((B, L), bool).at[1, :3].set(False)          # the second row left-padded
    return ids, pos, mask


def uses_fused_attention(fn) -> bool:
    with cudnn_tracing():
        text = str(jax.make_jaxpr(fn)())
    return any(p in text for p in FUSED_ATTENTION_PRIMITIVES)


def test_train_attention_reaches_the_teacher_forced_pass_only():
    model = tiny_ar()
    ids, pos, mask = inputs()
    assert not uses_fused_attention(lambda: model.hidden_states(ids, pos, mask))
    set_ar_train_attention(model, "cudnn")
    assert uses_fused_attention(lambda: model.hidden_states(ids, pos, mask))
    cache = model.init_cache(B, 2 * L)
    assert not uses_fused_attention(lambda: model.prefill(ids, pos, mask, cache))


def test_load_applies_the_attention_to_the_dit_and_the_ar_update():
    from glm_jax.tiny import tiny_checkpoint
    stack = GlmImageStack.load(tiny_checkpoint(seed=0), components=("ar", "dit"), attention="cudnn")
    ar, dit = stack.ar.merge(), stack.dit.merge()
    assert [layer.self_attn.train_implementation for layer in ar.text.layers] == ["cudnn"] * len(ar.text.layers)
    assert all(layer.self_attn.implementation is None for layer in ar.text.layers)     # rollouts unchanged
    assert all(block.attn1.implementation == "cudnn" for block in dit.transformer_blocks)
    plain = GlmImageStack.load(tiny_checkpoint(seed=0), components=("ar",)).ar.merge()
    assert all(layer.self_attn.train_implementation is None for layer in plain.text.layers)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention runs on a GPU")
def test_cudnn_update_pass_matches_xla():
    """On a GPU, the loss and parameter gradients of the teacher-forced pass (bf16, a left-padded row) with cuDNN
    attention match XLA's attention to bf16 rounding."""
    model = tiny_ar(param_dtype=jnp.float32)
    graphdef, params = nnx.split(model, nnx.Param)
    ids, pos, mask = inputs()

    def loss(p, impl):
        m = nnx.merge(graphdef, p)
        set_ar_train_attention(m, impl)
        h = m.hidden_states(ids, pos, mask).astype(jnp.float32)
        return jnp.mean(jnp.sin(h) * mask[..., None])

    (l_ref, g_ref), (l_got, g_got) = (jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, impl)
                                      for impl in ("xla", "cudnn"))
    np.testing.assert_allclose(float(l_got), float(l_ref), rtol=2e-2)
    ref = np.concatenate([np.asarray(x, np.float32).ravel() for x in jax.tree.leaves(g_ref)])
    got = np.concatenate([np.asarray(x, np.float32).ravel() for x in jax.tree.leaves(g_got)])
    assert np.linalg.norm(got - ref) <= 2e-2 * np.linalg.norm(ref)
