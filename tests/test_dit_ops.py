"""The DiT ops with hand-written backward passes (`glm_jax.models.dit_ops`): values and gradients against autodiff
of the plain formulas, and the GPU kernels (in Pallas' interpreter here; compiled with `JAX_PLATFORMS=cuda` on a
GPU) against the plain-JAX path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glm_jax.models import dit_ops

KERNEL_ATOL = 2e-5


def rnd(seed, *shape, scale=1.0, shift=0.0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape) * scale + shift, jnp.float32)


def rel_err(a, b):
    """Max difference relative to the largest magnitude of `b` (absolute where `b` is all zeros)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1.0 if not np.any(b) else 0.0))


def plain_sublayer(x, shift, scale, gate, w, b, t):
    """One sub-layer written without the custom ops: per-stream vectors picked with `where`, LayerNorm by hand,
    a nonlinear sub-layer `tanh(u @ w)` with an output bias, so that every cotangent depends on the position."""
    length = x.shape[1]
    pick = lambda v: jnp.where((jnp.arange(length) < t)[None, :, None], v[:, :1], v[:, 1:])
    mean = x.mean(-1, keepdims=True)
    h = (x - mean) / jnp.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + 1e-5)
    u = h * (1 + pick(scale)) + pick(shift)
    return x + pick(gate) * (jnp.tanh(u @ w) + b)


def custom_sublayer(x, shift, scale, gate, w, b, t):
    u, xr = dit_ops.modulate_split(x, shift, scale, t)
    return dit_ops.gated_residual(xr, jnp.tanh(u @ w), b, gate, t)


def check_grads(plain, custom, args, cot, tol=1e-5):
    assert rel_err(custom(*args), plain(*args)) < tol
    argnums = tuple(range(len(args)))
    gp = jax.grad(lambda *a: jnp.vdot(plain(*a), cot), argnums=argnums)(*args)
    gc = jax.grad(lambda *a: jnp.vdot(custom(*a), cot), argnums=argnums)(*args)
    for i, (a, b) in enumerate(zip(gc, gp)):
        assert rel_err(a, b) < tol, (i, rel_err(a, b))
    return gc


@pytest.mark.parametrize("t", [0, 5, 40])
def test_modulation_ops_match_autodiff(t, monkeypatch):
    """The ops' hand-written backward passes (their kernels in Pallas' interpreter) against autodiff of the plain
    formulas, values and every gradient; 48 positions per sample in row blocks of 16, so that t = 5 and 40 put
    both streams in one block, and the forward kernel's statistics merge two column chunks (D = 1024)."""
    monkeypatch.setenv("GLM_JAX_DIT_KERNELS", "interpret")
    b, length, d = 2, 48, 1024
    args = (rnd(0, b, length, d, shift=0.5), rnd(1, b, 2, d, scale=0.3), rnd(2, b, 2, d, scale=0.3),
            rnd(3, b, 2, d, scale=0.5), rnd(4, d, d, scale=d ** -0.5), rnd(5, d, scale=0.2))
    cot = rnd(6, b, length, d)
    assert "pallas_call" in str(jax.make_jaxpr(jax.grad(lambda *a: jnp.vdot(custom_sublayer(*a, t), cot)))(*args))
    grads = check_grads(lambda *a: plain_sublayer(*a, t), lambda *a: custom_sublayer(*a, t), args, cot)
    if t == 0:   # no text position: the text rows of the per-stream gradients are exactly zero
        for g in grads[1:4]:
            assert not np.any(np.asarray(g[:, 0]))


def test_modulation_ops_without_kernels_are_the_plain_formulas():
    """Where the kernels do not apply (here: CPU, and 21 positions, not a multiple of 8), the ops are the plain
    formulas differentiated by JAX: the same values and gradients, and no Pallas call."""
    b, length, d, t = 2, 21, 32, 5
    args = (rnd(0, b, length, d, shift=0.5), rnd(1, b, 2, d, scale=0.3), rnd(2, b, 2, d, scale=0.3),
            rnd(3, b, 2, d, scale=0.5), rnd(4, d, d, scale=d ** -0.5), rnd(5, d, scale=0.2))
    assert "pallas_call" not in str(jax.make_jaxpr(lambda *a: custom_sublayer(*a, t))(*args))
    check_grads(lambda *a: plain_sublayer(*a, t), lambda *a: custom_sublayer(*a, t), args, rnd(6, b, length, d))


def plain_norm_rope(y, bias, cos, sin):
    b, length, d = y.shape
    k = cos.shape[-1]
    x = (y + bias).reshape(b, length, d // k, k)
    mean = x.mean(-1, keepdims=True)
    xn = (x - mean) / jnp.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + 1e-5)
    rot = jnp.concatenate([-xn[..., k // 2:], xn[..., :k // 2]], -1)
    return (xn * cos[None, :, None] + rot * sin[None, :, None]).reshape(y.shape)


def tables(length, k):
    ang = rnd(7, length, k // 2, scale=2.0)
    ang = jnp.concatenate([ang, ang], -1)
    return jnp.cos(ang), jnp.sin(ang)


def test_qk_norm_rope_matches_autodiff():
    b, length, heads, k = 2, 12, 3, 16
    cos, sin = tables(length, k)
    args = (rnd(8, b, length, heads * k, shift=0.3), rnd(9, heads * k, scale=0.5))
    check_grads(lambda y, bias: plain_norm_rope(y, bias, cos, sin),
                lambda y, bias: dit_ops.qk_norm_rope(y, bias, cos, sin), args, rnd(10, b, length, heads * k))


def test_bias_gelu_matches_autodiff():
    args = (rnd(11, 2, 12, 64, scale=2.0), rnd(12, 64, scale=0.5))
    check_grads(lambda h, b: jax.nn.gelu(h + b, approximate=True), dit_ops.bias_gelu, args, rnd(13, 2, 12, 64))


# ------------------------------------------------------------------------------------------------ the kernels

B, L, D = 2, 128 * 3, 1024   # 3 x 128 positions per sample: row blocks of 32 hold one stream or both (t = 40)


def test_norm_rope_and_gelu_kernels_match_plain_path():
    k = 64
    cos, sin = tables(L, k)
    y, bias, g = rnd(30, B, L, D, shift=0.3), rnd(31, D, scale=0.5), rnd(32, B, L, D)
    out, res = dit_ops._qk_fwd(y, bias, cos, sin)
    dx, dbias, _, _ = dit_ops._qk_bwd(res, g)
    np.testing.assert_allclose(dit_ops.norm_rope_kernel(y, bias, cos, sin, interpret=True), out, rtol=1e-5,
                               atol=KERNEL_ATOL)
    dx_k, dbias_k = dit_ops.norm_rope_backward_kernel(y, bias, cos, sin, g, interpret=True)
    np.testing.assert_allclose(dx_k, dx, rtol=1e-5, atol=KERNEL_ATOL)
    np.testing.assert_allclose(dbias_k, dbias, rtol=1e-5, atol=1e-4)

    f = 512
    h, bias, g = rnd(33, B, L, f, scale=2.0), rnd(34, f, scale=0.5), rnd(35, B, L, f)
    out, res = dit_ops._gelu_fwd(h, bias)
    dh, dbias = dit_ops._gelu_bwd(res, g)
    np.testing.assert_allclose(dit_ops.gelu_kernel(h, bias, interpret=True), out, rtol=1e-5, atol=KERNEL_ATOL)
    dh_k, dbias_k = dit_ops.gelu_backward_kernel(h, bias, g, interpret=True)
    # the derivative's second term (torch's formula) multiplies 1 - tanh² of the inner argument by
    # 0.5 x c (1 + 3 a x²) (c = sqrt(2 / pi) < 1, left out of the bound): where tanh saturates (x < -6) no digit
    # of 1 - tanh² is left in float32, and two compilations whose tanh differs by a few ulps there (XLA at
    # -O0 / -O2) differ by that conditioning
    x = np.asarray(h + bias, np.float64)
    cond = 16 * np.finfo(np.float32).eps * np.abs(np.asarray(g) * 0.5 * x * (1 + 3 * 0.044715 * x * x))
    err = np.abs(np.asarray(dh_k, np.float64) - np.asarray(dh, np.float64))
    bad = err > 1e-5 * np.abs(np.asarray(dh)) + KERNEL_ATOL + cond
    assert not bad.any(), (np.argwhere(bad)[:4], err[bad][:4], x[bad][:4])
    np.testing.assert_allclose(dbias_k, dbias, rtol=1e-5, atol=1e-4)


def test_kernel_tiling_rules():
    assert dit_ops._block_rows(4352, 4096) == 32          # 1024², 256 glyph tokens
    assert dit_ops._block_rows(4096 + 8, 4096) == 8
    assert dit_ops._block_rows(4096 + 5, 4096) is None    # these run as plain JAX
    assert dit_ops._block_rows(4352, 4000) is None
    assert dit_ops._block_rows(4352, 16384, 256) == 32
    assert jax.default_backend() == "gpu" or not dit_ops._use_kernels(4352, 4096)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="compiles the Triton kernels: GPU only")
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_compiled_kernels_on_gpu(dtype, monkeypatch):
    """At the real 1024² shapes: every op's forward and backward with the compiled kernels (inputs in `dtype`)
    equal the plain-JAX path in float32 on the same values, to the rounding of `dtype`."""
    b, length, d, f, k, t = 1, 4352, 4096, 16384, 128, 256
    c = lambda a: a.astype(dtype)
    v = dict(x=c(rnd(40, b, length, d, shift=0.5)), g=c(rnd(41, b, length, d)), du=c(rnd(42, b, length, d)),
             bias=c(rnd(46, d)), h=c(rnd(47, b, length, f, scale=2.0)), gh=c(rnd(48, b, length, f)),
             bias_f=c(rnd(49, f)), shift=rnd(43, b, 2, d, scale=0.3), scale=rnd(44, b, 2, d, scale=0.3),
             gate=rnd(45, b, 2, d))
    cos, sin = tables(length, k)

    def run(v):
        def vjp(fn, *a):
            out, back = jax.vjp(fn, *a)
            return out, back(jax.tree.map(jnp.ones_like, out))
        mod = lambda x, s, sc: dit_ops.modulate_split(x, s, sc, t)
        return jax.jit(lambda v: [
            vjp(mod, v["x"], v["shift"], v["scale"]),
            vjp(lambda x, f_, b_, gt: dit_ops.gated_residual(x, f_, b_, gt, t), v["x"], v["du"], v["bias"], v["gate"]),
            vjp(dit_ops.qk_norm_rope, v["g"], v["bias"], cos, sin),
            vjp(dit_ops.bias_gelu, v["h"], v["bias_f"]),
            jax.vjp(mod, v["x"], v["shift"], v["scale"])[1]((v["du"], v["g"])),
            jax.vjp(dit_ops.bias_gelu, v["h"], v["bias_f"])[1](v["gh"]),
        ])(v)

    assert dit_ops._use_kernels(length, d) and dit_ops._use_kernels(length, f, dit_ops._GELU_BC)
    with_kernels = run(v)
    monkeypatch.setenv("GLM_JAX_DIT_KERNELS", "0")
    reference = run(jax.tree.map(lambda a: a.astype(jnp.float32), v))
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    for a, b_ in zip(jax.tree.leaves(with_kernels), jax.tree.leaves(reference)):
        assert rel_err(a, b_) <= tol, (a.shape, rel_err(a, b_))
