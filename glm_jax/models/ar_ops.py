"""The AR MLP's gated activation, `up * act(gate)` of `h = [gate; up]` (halves of the last axis), with a fused
backward pass on GPU.

Autodiff of the split and the product makes XLA write the gradient of `h` in several passes over the
`[tokens, 2 * intermediate]` activation, the last a copy of both halves into their concatenation; even without
that copy (both halves as one `where`), three passes took 1.08 ms per layer and micro-batch of 8 sequences of
1342 tokens at real width on an H100, where reading `h` and `g` and writing `dh` once takes about 0.5 ms
(`benchmarks/RESULTS.md`). For SiLU (the real config's `hidden_act`) the backward pass here is one Pallas
(Triton) kernel that reads each tile of `gate`, `up` and `g` once and writes both halves of `dh`, computing what
torch's autograd does in bf16:

    d_up   = g * silu(gate)                    (silu(gate) rounded to the dtype, as the forward's product uses it)
    d_act  = g * up                            (rounded)
    d_gate = d_act * s * (1 + gate * (1 - s))  (s = sigmoid(gate), in float32; torch's `silu_backward`)

The forward pass stays XLA's one fused elementwise pass. Elsewhere (CPU, another activation, intermediate sizes
the kernel does not tile, a mesh whose `tensor` axis splits the activation, `GLM_JAX_AR_KERNELS=0`) the plain
formula is differentiated by JAX. `GLM_JAX_AR_KERNELS=interpret` runs the kernel in Pallas' interpreter on any
backend (tests).

`add_rms_norm` serves the one-token decode steps of the sampler: a sandwich-norm layer's residual update and the
norm after it (`y = x + rms_norm(a, w1)`, `rms_norm(y, w2)`) as one kernel per row where XLA runs several kernels
of 1-3 µs each; the decode loop of `GlmImageText` calls it twice per layer (+1.3-1.4% decode steps per second on
an H200, `benchmarks/RESULTS.md`). It rounds after each operation as torch does; the plain formulas under XLA
may keep a fused bf16 chain in float32, so the two can differ in the last bit of some elements.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from glm_jax.models.layers import rms_norm
from glm_jax.models.pallas_tiles import interpreted, kernels_on, tile, tiled_call, triton_params
from glm_jax.sharding import per_device

_SWITCH = "GLM_JAX_AR_KERNELS"
_ROWS = (16, 8, 4, 2, 1)      # rows per program: the first that divides the tokens
_COLS = (128, 64, 32, 16)      # columns per program: the first that divides the intermediate size


def _cols(f: int) -> int | None:
    """Columns per program for intermediate size `f`, or None where it does not tile."""
    return next((c for c in _COLS if f % c == 0), None)


def _use_kernel(h: jax.Array, act) -> bool:
    return (act is jax.nn.silu and kernels_on(_SWITCH) and h.shape[-1] % 2 == 0
            and _cols(h.shape[-1] // 2) is not None)


def _plain(h: jax.Array, act) -> jax.Array:
    gate, up = jnp.split(h, 2, axis=-1)
    return up * act(gate)


def gated_activation(h: jax.Array, act) -> jax.Array:
    """`up * act(gate)` with `[gate; up] = h` along the last axis, in the dtype of `h` (the AR's `TextMLP`)."""
    if _use_kernel(h, act):
        return _silu_gate_op(h)
    return _plain(h, act)


@jax.custom_vjp
def _silu_gate_op(h):
    return _plain(h, jax.nn.silu)


def _silu_gate_fwd(h):
    return _plain(h, jax.nn.silu), h


def _silu_gate_bwd(h, g):
    if h.ndim >= 3:   # [B, T, 2F]: per device on its samples under a mesh
        return per_device(lambda h_, g_: (silu_gate_backward_kernel(h_, g_),), (h, g), (True, True), ("batch",))
    return (silu_gate_backward_kernel(h, g),)


_silu_gate_op.defvjp(_silu_gate_fwd, _silu_gate_bwd)


def _silu_gate_bwd_kernel(h_ref, g_ref, dh_ref, *, ids, br, bc, f):
    i, j = ids
    r0, c0 = i * br, j * bc
    dt = dh_ref.dtype
    x = tile(h_ref, r0, c0, br, bc)
    up = tile(h_ref, r0, f + c0, br, bc)
    g = tile(g_ref, r0, c0, br, bc)
    s = 1.0 / (1.0 + jnp.exp(-x))
    act = (x * s).astype(dt).astype(jnp.float32)
    d_act = (g * up).astype(dt).astype(jnp.float32)
    dh_ref[pl.ds(r0, br), pl.ds(c0, bc)] = (d_act * (s * (1.0 + x * (1.0 - s)))).astype(dt)
    dh_ref[pl.ds(r0, br), pl.ds(f + c0, bc)] = (g * act).astype(dt)


def silu_gate_backward_kernel(h: jax.Array, g: jax.Array, *, interpret: bool = False) -> jax.Array:
    """`d[gate; up]` of `up * silu(gate)` by the Pallas kernel: `h [..., 2F]`, `g [..., F]` -> `[..., 2F]`."""
    two_f = h.shape[-1]
    f = two_f // 2
    h2, g2 = h.reshape(-1, two_f), g.reshape(-1, f)
    rows = h2.shape[0]
    br, bc = next(r for r in _ROWS if rows % r == 0), _cols(f)
    kern = partial(_silu_gate_bwd_kernel, br=br, bc=bc, f=f)
    dh = tiled_call(kern, (h2, g2), jax.ShapeDtypeStruct((rows, two_f), h.dtype), (rows // br, f // bc),
                    interpret=interpret or interpreted(_SWITCH))
    return dh.reshape(h.shape)


# ---------------------------------------------------------------------------------------- decode-step norms


def _add_rms_plain(x, a, w_add, w_next, eps_add: float, eps_next: float):
    y = x + rms_norm(a, w_add, eps_add)
    return y, rms_norm(y, w_next, eps_next)


def _add_rms_kernel(x_ref, a_ref, wa_ref, wn_ref, y_ref, z_ref, *, eps_add, eps_next):
    dt = y_ref.dtype
    f32 = jnp.float32
    a = a_ref[...].astype(f32)                                           # [D]: one row per program
    na = (a * jax.lax.rsqrt(jnp.mean(a * a) + eps_add)).astype(dt)
    y = (x_ref[...].astype(f32) + (wa_ref[...].astype(f32) * na.astype(f32)).astype(dt).astype(f32)).astype(dt)
    y_ref[...] = y
    y32 = y.astype(f32)
    ny = (y32 * jax.lax.rsqrt(jnp.mean(y32 * y32) + eps_next)).astype(dt)
    z_ref[...] = (wn_ref[...].astype(f32) * ny.astype(f32)).astype(dt)


def add_rms_norm_kernel(x: jax.Array, a: jax.Array, w_add: jax.Array, w_next: jax.Array, eps_add: float,
                        eps_next: float, *, interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """`add_rms_norm` by the Pallas kernel: `x, a [R, D]` (one program per row), weights `[D]` already in the
    dtype of `x`."""
    r, d = x.shape
    kern = partial(_add_rms_kernel, eps_add=float(eps_add), eps_next=float(eps_next))
    row = pl.BlockSpec((None, d), lambda i: (i, 0))
    vec = pl.BlockSpec((d,), lambda i: (0,))
    out = jax.ShapeDtypeStruct((r, d), x.dtype)
    interpret = interpret or interpreted(_SWITCH)
    call = pl.pallas_call(kern, grid=(r,), in_specs=[row, row, vec, vec], out_specs=[row, row], out_shape=[out, out],
                          interpret=interpret, name="glm_add_rms_norm",
                          **triton_params(interpret, num_warps=4, num_stages=1))
    return tuple(call(x, a, w_add, w_next))


def add_rms_norm(x: jax.Array, a: jax.Array, w_add: jax.Array, w_next: jax.Array, eps_add: float,
                 eps_next: float) -> tuple[jax.Array, jax.Array]:
    """`y = x + rms_norm(a, w_add)` and `rms_norm(y, w_next)`, both in the dtype of `x`: a sandwich-norm layer's
    residual update followed by the next norm (the AR's one-token decode steps). On GPU one Pallas kernel per row
    where XLA runs several small kernels (each 1-3 µs at a decode step's size); elsewhere, for hidden sizes that
    are not a power of two, a sub-layer output `a` in another dtype than `x`, or with `GLM_JAX_AR_KERNELS=0`, the
    plain formulas. Not differentiable on the kernel path (the decode loop is not differentiated). Under a mesh
    the kernel runs per device on its rows (`sharding.per_device`)."""
    d = x.shape[-1]
    if not (kernels_on(_SWITCH) and d & (d - 1) == 0 and d >= 16 and a.dtype == x.dtype):
        return _add_rms_plain(x, a, w_add, w_next, eps_add, eps_next)
    shape = x.shape
    x2, a2 = x.reshape(-1, d), a.reshape(-1, d)
    wa, wn = w_add.astype(x.dtype), w_next.astype(x.dtype)
    y, z = per_device(lambda x_, a_, wa_, wn_: add_rms_norm_kernel(x_, a_, wa_, wn_, eps_add, eps_next),
                      (x2, a2, wa, wn), (True, True, False, False), ("batch", "batch"))
    return y.reshape(shape), z.reshape(shape)
