"""The AR MLP's gated activation (`glm_jax.models.ar_ops`): the fused backward kernel (Pallas' interpreter on CPU,
compiled on a GPU) against autodiff of the plain formula and against torch autograd in bf16."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from glm_jax.models import ar_ops
from tests.util import rel_err


def rnd(seed, *shape, scale=1.0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * scale)


def grads(h, g, act=jax.nn.silu):
    out, back = jax.vjp(lambda h_: ar_ops.gated_activation(h_, act), h)
    return out, back(g)[0]


def plain_grads(h, g, act=jax.nn.silu):
    out, back = jax.vjp(lambda h_: ar_ops._plain(h_, act), h)
    return out, back(g)[0]


# rows 2 x 7 (programs of 2 rows) and 3 x 8 (8 rows); intermediate 48 (16-column tiles) and 192 (64)
@pytest.mark.parametrize("shape", [(2, 7, 96), (3, 8, 384)])
def test_kernel_backward_equals_autodiff_float32(shape, monkeypatch):
    monkeypatch.setenv("GLM_JAX_AR_KERNELS", "interpret")
    h, g = rnd(0, *shape, scale=3.0), rnd(1, *shape[:-1], shape[-1] // 2)
    jaxpr = str(jax.make_jaxpr(grads)(h, g))
    assert "pallas_call" in jaxpr                         # the kernel ran, not the fallback
    out, dh = grads(h, g)
    ref_out, ref_dh = plain_grads(h, g)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref_out))
    assert rel_err(dh, ref_dh) < 1e-6
    f = shape[-1] // 2
    # each half is checked on its own: a swapped or misplaced half fails
    assert rel_err(dh[..., :f], ref_dh[..., :f]) < 1e-6 and rel_err(dh[..., f:], ref_dh[..., f:]) < 1e-6


def test_kernel_backward_matches_torch_in_bf16(monkeypatch):
    """The bf16 gradient is torch autograd's for `up * silu(gate)` on bf16 tensors (the reference MLP's), up to
    the float32 `exp` rounding: within one bf16 step everywhere, bit-equal almost everywhere. The kernel is
    compiled on a GPU (there: bit-equal on every element, H100, 2026-11-28) and interpreted elsewhere; interpreted
    on a GPU it is not torch's (74% bit-equal: XLA's GPU compiler drops the intermediate bf16 roundings that
    Triton keeps)."""
    monkeypatch.setenv("GLM_JAX_AR_KERNELS", "1" if jax.default_backend() == "gpu" else "interpret")
    f = 64
    h, g = rnd(2, 4, 16, 2 * f, scale=3.0).astype(jnp.bfloat16), rnd(3, 4, 16, f).astype(jnp.bfloat16)
    _, dh = grads(h, g)
    th = torch.from_numpy(np.array(h.astype(jnp.float32))).to(torch.bfloat16).requires_grad_()
    gate, up = th.chunk(2, dim=-1)
    out = up * torch.nn.functional.silu(gate)
    out.backward(torch.from_numpy(np.array(g.astype(jnp.float32))).to(torch.bfloat16))
    ref = th.grad.float().numpy()
    got = np.asarray(dh.astype(jnp.float32))
    assert np.all(np.abs(got - ref) <= 2.0 ** -7 * np.abs(ref) + 1e-30)
    assert np.mean(got == ref) > 0.99


def test_kernel_is_used_only_where_it_applies(monkeypatch):
    h = jnp.zeros((2, 8, 2 * 64))
    monkeypatch.setenv("GLM_JAX_AR_KERNELS", "interpret")
    assert ar_ops._use_kernel(h, jax.nn.silu)
    assert not ar_ops._use_kernel(h, jax.nn.gelu)                     # another activation: autodiff
    assert not ar_ops._use_kernel(jnp.zeros((2, 8, 2 * 40)), jax.nn.silu)   # 40 columns do not tile
    monkeypatch.setenv("GLM_JAX_AR_KERNELS", "0")
    assert not ar_ops._use_kernel(h, jax.nn.silu)
    monkeypatch.delenv("GLM_JAX_AR_KERNELS")
    assert ar_ops._use_kernel(h, jax.nn.silu) == (jax.default_backend() == "gpu")
    # the fallback is the plain formula differentiated by JAX
    h, g = rnd(4, 2, 8, 80), rnd(5, 2, 8, 40)
    out, dh = grads(h, g)
    gate, up = np.split(np.asarray(h), 2, axis=-1)
    s = 1 / (1 + np.exp(-gate))
    np.testing.assert_allclose(np.asarray(out), up * gate * s, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(dh[..., 40:]), np.asarray(g) * gate * s, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="compiles the Triton kernel: GPU only")
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_compiled_kernel_on_gpu(dtype, monkeypatch):
    """At the real width (8 sequences of 1342 tokens, intermediate 13696): the compiled kernel's gradient equals
    the plain path's in float32 on the same values, to the rounding of `dtype`."""
    h, g = rnd(6, 8, 1342, 2 * 13696, scale=3.0).astype(dtype), rnd(7, 8, 1342, 13696).astype(dtype)
    assert ar_ops._use_kernel(h, jax.nn.silu)
    _, dh = jax.jit(grads)(h, g)
    monkeypatch.setenv("GLM_JAX_AR_KERNELS", "0")
    _, ref = jax.jit(plain_grads)(h.astype(jnp.float32), g.astype(jnp.float32))
    assert rel_err(dh, ref) <= (1e-6 if dtype == jnp.float32 else 1e-2)


def test_kernels_are_off_without_pallas_triton(monkeypatch):
    """A JAX without Pallas' Triton backend (deprecated in jax 0.11) runs the plain formulas after one warning,
    instead of failing at the first kernel; with the backend, the same (GPU) setting runs the kernels."""
    import sys

    from glm_jax.models import pallas_tiles
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.delenv("GLM_JAX_AR_KERNELS", raising=False)
    pallas_tiles.triton_available.cache_clear()
    try:
        assert pallas_tiles.triton_available() and pallas_tiles.kernels_on("GLM_JAX_AR_KERNELS")
        monkeypatch.setitem(sys.modules, "jax.experimental.pallas.triton", None)      # the import fails
        pallas_tiles.triton_available.cache_clear()
        with pytest.warns(UserWarning, match="Triton backend is not available"):
            assert not pallas_tiles.kernels_on("GLM_JAX_AR_KERNELS")
        assert not ar_ops._use_kernel(rnd(0, 4, 32), jax.nn.silu)
    finally:
        pallas_tiles.triton_available.cache_clear()


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="the kernels' default on a GPU")
def test_kernels_are_on_by_default_on_a_gpu(monkeypatch):
    """The JAX of the GPU machine has Pallas' Triton backend, so the fused kernels run unless switched off."""
    from glm_jax.models import pallas_tiles
    for switch in ("GLM_JAX_AR_KERNELS", "GLM_JAX_DIT_KERNELS"):
        monkeypatch.delenv(switch, raising=False)
        assert pallas_tiles.kernels_on(switch), switch
    assert ar_ops._use_kernel(rnd(0, 4, 32), jax.nn.silu)


# ------------------------------------------------------------------------------- decode-step add + RMSNorm


def _norm_inputs(rows, d, dtype, seed=0):
    x, a = rnd(seed, rows, d, scale=2.0).astype(dtype), rnd(seed + 1, rows, d, scale=5.0).astype(dtype)
    w1, w2 = 1.0 + rnd(seed + 2, d, scale=0.3), 1.0 + rnd(seed + 3, d, scale=0.3)   # float32 params
    return x, a, w1, w2


def _layer_formulas(x, a, w1, w2, eps1, eps2):
    """What `TextDecoderLayer` computes between two sub-layers: its residual add and `RMSNorm`s."""
    from glm_jax.models.layers import rms_norm
    y = x + rms_norm(a, w1, eps1)
    return y, rms_norm(y, w2, eps2)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_add_rms_norm_kernel_matches_the_layer_formulas(dtype, monkeypatch):
    """`add_rms_norm` (a sandwich norm's residual update and the next norm, fused for decode steps): the kernel in
    Pallas' interpreter against the layers' own RMSNorm formulas, on rows of very different scales; with the
    kernels off the op is those formulas exactly."""
    x, a, w1, w2 = _norm_inputs(5, 64, dtype)
    a = a * jnp.asarray([[1e-3], [1.0], [30.0], [1.0], [1e2]], dtype)
    want = jax.jit(_layer_formulas, static_argnums=(4, 5))(x, a, w1, w2, 1e-5, 1e-6)
    op = lambda: lambda *v: ar_ops.add_rms_norm(*v, 1e-5, 1e-6)   # a new function per setting: traced afresh
    monkeypatch.setenv("GLM_JAX_AR_KERNELS", "0")
    plain = jax.jit(op())(x, a, w1, w2)
    for p, w in zip(plain, want):
        assert p.dtype == dtype and np.array_equal(np.asarray(p, np.float32), np.asarray(w, np.float32))
    monkeypatch.setenv("GLM_JAX_AR_KERNELS", "interpret")
    assert "pallas_call" in str(jax.make_jaxpr(op())(x, a, w1, w2))
    got = jax.jit(op())(x, a, w1, w2)
    ref32 = jax.jit(_layer_formulas, static_argnums=(4, 5))(x.astype(jnp.float32), a.astype(jnp.float32), w1, w2,
                                                            1e-5, 1e-6)
    for g, p, r in zip(got, plain, ref32):
        assert g.shape == p.shape and g.dtype == dtype
        if dtype == jnp.float32:
            assert rel_err(g, p) < 1e-6
        else:   # XLA keeps the fused bf16 chain in float32 (excess precision), the kernel rounds after each op as
            # torch does: both within bf16 rounding of the float32 formulas
            assert rel_err(g, r) <= max(2 * rel_err(p, r), 2 ** -8)


def test_add_rms_norm_falls_back_where_the_kernel_does_not_apply(monkeypatch):
    """Hidden sizes that are not a power of two, or a sub-layer output in another dtype, take the plain formulas
    even with the kernels on."""
    monkeypatch.setenv("GLM_JAX_AR_KERNELS", "interpret")
    op = lambda *v: ar_ops.add_rms_norm(*v, 1e-5, 1e-5)
    x, a, w1, w2 = _norm_inputs(3, 64, jnp.float32)
    assert "pallas_call" in str(jax.make_jaxpr(op)(x, a, w1, w2))
    assert "pallas_call" not in str(jax.make_jaxpr(op)(x, a.astype(jnp.bfloat16), w1, w2))
    x, a, w1, w2 = _norm_inputs(3, 96, jnp.float32)
    assert "pallas_call" not in str(jax.make_jaxpr(op)(x, a, w1, w2))


def test_decode_steps_with_fused_norms_match_the_layers(monkeypatch):
    """Decode steps of the tiny AR text model (float32) with `fuse_norms` (the kernel in Pallas' interpreter) and
    with the layer-by-layer norms (`fuse_norms=False`) both give the full forward's logits."""
    from flax import nnx

    from glm_jax.models.ar import ArConfig, GlmImageAR
    from glm_jax.tiny import tiny_ar_config
    monkeypatch.setenv("GLM_JAX_AR_KERNELS", "interpret")
    cfg = ArConfig.from_hf(tiny_ar_config())
    m = GlmImageAR(cfg, rngs=nnx.Rngs(0), with_vision=False)
    norms = [n for layer in m.text.layers for n in (layer.input_layernorm, layer.post_self_attn_layernorm,
                                                    layer.post_attention_layernorm, layer.post_mlp_layernorm)]
    for i, n in enumerate([*norms, m.text.norm]):   # a different weight for every norm: a swapped one would show
        n.weight.set_value(n.weight.get_value() + 0.3 * jax.random.normal(jax.random.key(i), n.weight.shape))
    b, length, steps = 2, 8, 2
    ids = jax.random.randint(jax.random.key(3), (b, length), 0, cfg.text.vision_vocab_size)
    pos = jnp.broadcast_to(jnp.arange(length)[None, None], (3, b, length))
    full = m.forward(ids, pos)
    scale = float(jnp.abs(full).max())
    prefix = m.prefill(ids[:, :-steps], pos[:, :, :-steps], None, m.init_cache(b, length))[1]
    for fuse in (True, False):
        m.text.fuse_norms = fuse
        graphdef, state = nnx.split(m)
        decode = jax.jit(lambda s, t, p, c, i, g=graphdef: nnx.merge(g, s).decode(t, p, c, i))
        jaxpr = str(jax.make_jaxpr(decode)(state, ids[:, 0], pos[:, :, 0], prefix, length - steps))
        assert ("glm_add_rms_norm" in jaxpr) == fuse   # by name: on a GPU the decode attention is a kernel too
        cache = prefix
        for n in range(length - steps, length):
            logits, cache = decode(state, ids[:, n], pos[:, :, n], cache, n)
            assert float(jnp.abs(logits - full[:, n]).max()) < 1e-5 * scale, (fuse, n)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="compiles the Triton kernel: GPU only")
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_compiled_add_rms_norm_on_gpu(dtype, monkeypatch):
    """At the real width (32 rows of 4096): the compiled kernel against the layers' formulas in float32 on the same
    values, to the rounding of `dtype`."""
    x, a, w1, w2 = _norm_inputs(32, 4096, dtype, seed=4)
    monkeypatch.delenv("GLM_JAX_AR_KERNELS", raising=False)
    fn = jax.jit(lambda *v: ar_ops.add_rms_norm(*v, 1e-5, 1e-5))
    assert "pallas_call" in str(jax.make_jaxpr(fn)(x, a, w1, w2))
    got = fn(x, a, w1, w2)
    want = jax.jit(_layer_formulas, static_argnums=(4, 5))(x.astype(jnp.float32), a.astype(jnp.float32), w1, w2,
                                                           1e-5, 1e-5)
    for g, w in zip(got, want):
        assert g.dtype == dtype and rel_err(g, w) <= (1e-6 if dtype == jnp.float32 else 1e-2)
