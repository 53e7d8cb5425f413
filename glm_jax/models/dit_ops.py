"""DiT operations with hand-written backward passes and, on GPU, fused Pallas (Triton) kernels.

A DiT block applies, twice (attention, then FF), to the joint stream `x = [text ; image]` (`t` text tokens
first, `[B, L, D]`):

    u = LN(x) * (1 + scale_s) + shift_s          modulate_split(x, shift, scale, t) -> (u, x)
    y = x + gate_s * (F(u) + b)                    gated_residual(x, F(u), b, gate, t)

where `shift`, `scale`, `gate` are `[B, 2, D]` (row 0: text stream, row 1: image stream), `s` is the stream of
each position and `b` the bias of the sub-layer's last projection (applied here rather than in the matmul, so
that its gradient comes out of the same pass). Autodiff of this composition makes XLA reduce the cotangents
stream by stream (copying each stream's slice out first), with several column reductions and a separate
residual-gradient sum per sub-layer. Here each op's backward pass is one elementwise pass that also produces
the per-stream column sums:

* `gated_residual` backward: `dF = g * gate_s`, `db = sum(dF)` and `dgate_s = sum_s(g * (F + b))`; the
  cotangent of `x` is `g` itself.
* `modulate_split` returns `x` as its second output, so that the residual path's cotangent reaches its backward
  pass separately from the modulation's: `dx = g_residual + LN'(du * (1 + scale_s))`, plus
  `dshift_s = sum_s(du)` and `dscale_s = sum_s(du * LN(x))`, in one pass.

The attention's per-head qk LayerNorm + RoPE (`qk_norm_rope`) and the FF's tanh GELU (`bias_gelu`) take the
bias of the projection before them the same way; their backward passes write the input gradient and the bias
gradient's partial sums in one pass.

On GPU the passes are Pallas (Triton) kernels that write the output tile and per-row-block column partial
sums (summed afterwards: deterministic). They need the rows per sample to be a multiple of 8: `GlmImageDiT`
pads its stream to `kernel_length` (the padding rows are masked out of the attention's keys and dropped at
the end, so they change no value and no gradient). Elsewhere, or for shapes the kernels do not tile (rows per
sample not a multiple of 8; feature sizes not a multiple of the column tile), the
modulation and gated residual are the plain formulas differentiated by JAX, and the norm + RoPE and GELU keep
their hand-written backward passes in plain JAX. Both are checked against autodiff of the plain formulas
(`tests/test_dit_ops.py`: the kernels in Pallas' interpreter, and compiled on a GPU).

Environment (read while tracing): `GLM_JAX_DIT_KERNELS=0` runs the plain-JAX formulas everywhere,
`GLM_JAX_DIT_KERNELS=interpret` runs the kernels in Pallas' interpreter on any backend (tests). The tile sizes
can be overridden for `benchmarks/dit_ops_probe.py`'s sweeps: `GLM_JAX_K_ROWS`, `GLM_JAX_K_BC`, `GLM_JAX_K_FROWS`
(rows / columns per program), `GLM_JAX_K_WARPS`, `GLM_JAX_K_ORDER` (`cols`: neighbouring programs take
neighbouring column tiles; `rows`), `GLM_JAX_K_MODFWD=0` (the modulation forward in XLA).
"""

from __future__ import annotations

import math
import os
from functools import partial

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from glm_jax.models.layers import ln_stats
from glm_jax.models.pallas_tiles import interpreted, kernels_on, tiled_call
from glm_jax.models.pallas_tiles import tile as _tile
from glm_jax.sharding import per_device

LN_EPS = 1e-5
_ROWS = (32, 16, 8)  # rows per kernel program: the largest (up to a per-kernel bound) dividing the length
_GELU_C = math.sqrt(2.0 / math.pi)


def _select(v_B2D: jax.Array, t: int, length: int) -> jax.Array:
    """`[B, L, D]` view of per-stream vectors `[B, 2, D]`: row 0 at the first `t` positions, row 1 elsewhere.

    An elementwise choice on the position (`where(position < t, ...)`), which XLA fuses into its consumer. A
    concatenation of two broadcasts was as fast at `t = 256` but not at `t = 251`, where XLA ran the gated
    residual 2.5x slower and wrote the modulation backward's float32 product out before its row statistics
    (the real-size DiT step 3.5% slower, see benchmarks/RESULTS.md "Any glyph length")."""
    return jnp.where(_text_rows(t, length), v_B2D[:, :1], v_B2D[:, 1:])


def _text_rows(t: int, length: int) -> jax.Array:
    """`[1, L, 1]`: True at the first `t` positions (the text stream)."""
    return (jnp.arange(length) < t)[None, :, None]


def _block_rows(length: int, d: int, bc: int = 128, most: int = 32) -> int | None:
    """Rows per kernel program (at most `most`) for sequences of `length` rows and `d` features in tiles of
    `bc` columns, or None where the kernels do not apply. The sizes per kernel were picked on an H100 with
    `benchmarks/dit_ops_probe.py`."""
    if d % bc or bc & (bc - 1):
        return None
    most = int(os.environ.get("GLM_JAX_K_ROWS", str(most)))
    return next((r for r in _ROWS if r <= most and length % r == 0), None)


def _mod_bc() -> int:
    return int(os.environ.get("GLM_JAX_K_BC", "256"))


_SWITCH = "GLM_JAX_DIT_KERNELS"


def _interpret() -> bool:
    return interpreted(_SWITCH)


def _kernels_on() -> bool:
    return kernels_on(_SWITCH)


def _use_kernels(length: int, d: int, bc: int = 128) -> bool:
    return _kernels_on() and _block_rows(length, d, bc) is not None


ROW_MULTIPLE = _ROWS[-1]   # the kernels tile a sequence whose positions per sample are a multiple of this


def round_rows(length: int) -> int:
    """`length` rounded up to a multiple of `ROW_MULTIPLE`."""
    return -(-length // ROW_MULTIPLE) * ROW_MULTIPLE


def kernel_length(length: int, d: int) -> int:
    """The sequence length (positions per sample) to pad a `[B, length, d]` stream to so that the ops run their
    kernels: `length` where they already do, or where the kernels are off or do not tile `d`; else
    `round_rows(length)`. `GlmImageDiT` appends that many rows and masks them out of the attention's keys."""
    if not _kernels_on() or _use_kernels(length, d, _mod_bc()):
        return length
    padded = round_rows(length)
    return padded if _use_kernels(padded, d, _mod_bc()) else length


# ------------------------------------------------------------------------------------------------ Pallas kernels


def _pick(ref, b, c0, txt, bc):
    """`[BR, BC]` per-row choice between the text and image rows of a `[B * 2, D]` per-stream table."""
    vt = ref[pl.ds(2 * b, 1), pl.ds(c0, bc)].astype(jnp.float32)
    vi = ref[pl.ds(2 * b + 1, 1), pl.ds(c0, bc)].astype(jnp.float32)
    return jnp.where(txt[:, None], vt, vi)


def _store_sums(part_ref, i, c0, values, bc):
    """Column sums of each `[BR, BC]` value into rows `i * k + n` of the `[blocks * k, D]` partials."""
    k = len(values)
    for n, v in enumerate(values):
        part_ref[pl.ds(i * k + n, 1), pl.ds(c0, bc)] = jnp.sum(v, axis=0, keepdims=True)


def _gate_kernel(g_ref, f_ref, bias_ref, gate_ref, df_ref, part_ref, *, ids=None, t, length, br, bc):
    i, j = ids or (pl.program_id(0), pl.program_id(1))
    r0, c0 = i * br, j * bc
    b = r0 // length
    txt = (r0 % length + jnp.arange(br)) < t
    g = _tile(g_ref, r0, c0, br, bc)
    f = _tile(f_ref, r0, c0, br, bc) + bias_ref[pl.ds(0, 1), pl.ds(c0, bc)].astype(jnp.float32)
    df_ref[pl.ds(r0, br), pl.ds(c0, bc)] = (g * _pick(gate_ref, b, c0, txt, bc)).astype(df_ref.dtype)
    gf = g * f
    _store_sums(part_ref, i, c0, (jnp.where(txt[:, None], gf, 0.0), gf, jnp.where(txt[:, None], g, 0.0), g), bc)


def _mod_kernel(du_ref, x_ref, g_ref, stats_ref, sp_ref, dx_ref, part_ref, *, ids=None, t, length, br, bc):
    i, j = ids or (pl.program_id(0), pl.program_id(1))
    r0, c0 = i * br, j * bc
    b = r0 // length
    txt = (r0 % length + jnp.arange(br)) < t
    # [BR, 1] each: mean, rstd, mean(dh), mean(dh * h)
    mean, rstd, a, c = (stats_ref[pl.ds(r0, br), pl.ds(k, 1)] for k in range(4))
    du, x, g = (_tile(r, r0, c0, br, bc) for r in (du_ref, x_ref, g_ref))
    h = (x - mean) * rstd
    dh = du * _pick(sp_ref, b, c0, txt, bc)
    dx_ref[pl.ds(r0, br), pl.ds(c0, bc)] = (g + rstd * (dh - a - h * c)).astype(dx_ref.dtype)
    duh = du * h
    _store_sums(part_ref, i, c0, (jnp.where(txt[:, None], du, 0.0), du, jnp.where(txt[:, None], duh, 0.0), duh), bc)


def _modulate_fwd_kernel(x_ref, shift_ref, scale_ref, u_ref, stats_ref, *, ids=None, t, length, br, bc, d):
    """Whole rows: LayerNorm statistics in one pass over column chunks (chunk mean and squared deviations
    merged as in Chan et al.), then the modulated output in a second pass (the rows are still in L2)."""
    i = ids[0] if ids else pl.program_id(0)
    r0 = i * br
    b = r0 // length
    txt = (r0 % length + jnp.arange(br)) < t

    def stats(c, carry):
        m, m2 = carry
        x = _tile(x_ref, r0, c * bc, br, bc)
        mc = jnp.sum(x, axis=1, keepdims=True) / bc
        m2c = jnp.sum((x - mc) * (x - mc), axis=1, keepdims=True)
        na = (c * bc).astype(jnp.float32)
        delta = mc - m
        frac = bc / (na + bc)
        return m + delta * frac, m2 + m2c + delta * delta * na * frac

    zero = jnp.zeros((br, 1), jnp.float32)
    mean, m2 = jax.lax.fori_loop(0, d // bc, stats, (zero, zero))
    rstd = jax.lax.rsqrt(m2 / d + LN_EPS)
    stats_ref[pl.ds(r0, br), pl.ds(0, 1)] = mean
    stats_ref[pl.ds(r0, br), pl.ds(1, 1)] = rstd

    def out(c, carry):
        c0 = c * bc
        h = ((_tile(x_ref, r0, c0, br, bc) - mean) * rstd).astype(u_ref.dtype).astype(jnp.float32)
        u = h * (1 + _pick(scale_ref, b, c0, txt, bc)) + _pick(shift_ref, b, c0, txt, bc)
        u_ref[pl.ds(r0, br), pl.ds(c0, bc)] = u.astype(u_ref.dtype)
        return carry

    jax.lax.fori_loop(0, d // bc, out, 0)


def _norm_rope_tiles(y_ref, bias_ref, cos_ref, sin_ref, r0, c0, pos0, br, half):
    """Halves of one head's tile: `x = y + bias` centred, `rstd`, and the RoPE tables."""
    x1 = _tile(y_ref, r0, c0, br, half) + bias_ref[pl.ds(0, 1), pl.ds(c0, half)].astype(jnp.float32)
    x2 = _tile(y_ref, r0, c0 + half, br, half) + bias_ref[pl.ds(0, 1), pl.ds(c0 + half, half)].astype(jnp.float32)
    mean = (jnp.sum(x1, axis=1, keepdims=True) + jnp.sum(x2, axis=1, keepdims=True)) / (2 * half)
    x1, x2 = x1 - mean, x2 - mean
    var = (jnp.sum(x1 * x1, axis=1, keepdims=True) + jnp.sum(x2 * x2, axis=1, keepdims=True)) / (2 * half)
    rstd = jax.lax.rsqrt(var + LN_EPS)
    tabs = [_tile(r, pos0, k * half, br, half) for r in (cos_ref, sin_ref) for k in (0, 1)]
    return x1, x2, rstd, tabs


def _norm_rope_fwd_kernel(y_ref, bias_ref, cos_ref, sin_ref, o_ref, *, ids=None, length, br, half):
    i, j = ids or (pl.program_id(0), pl.program_id(1))
    r0, c0 = i * br, j * 2 * half
    x1, x2, rstd, (c1, c2, s1, s2) = _norm_rope_tiles(y_ref, bias_ref, cos_ref, sin_ref, r0, c0, r0 % length,
                                                      br, half)
    o_ref[pl.ds(r0, br), pl.ds(c0, half)] = (rstd * (x1 * c1 - x2 * s1)).astype(o_ref.dtype)
    o_ref[pl.ds(r0, br), pl.ds(c0 + half, half)] = (rstd * (x2 * c2 + x1 * s2)).astype(o_ref.dtype)


def _norm_rope_bwd_kernel(y_ref, bias_ref, cos_ref, sin_ref, g_ref, dx_ref, part_ref, *, ids=None, length, br, half):
    i, j = ids or (pl.program_id(0), pl.program_id(1))
    r0, c0 = i * br, j * 2 * half
    x1, x2, rstd, (c1, c2, s1, s2) = _norm_rope_tiles(y_ref, bias_ref, cos_ref, sin_ref, r0, c0, r0 % length,
                                                      br, half)
    g1, g2 = _tile(g_ref, r0, c0, br, half), _tile(g_ref, r0, c0 + half, br, half)
    dn1, dn2 = g1 * c1 + g2 * s2, g2 * c2 - g1 * s1          # through the RoPE
    h1, h2 = x1 * rstd, x2 * rstd
    m1 = (jnp.sum(dn1, axis=1, keepdims=True) + jnp.sum(dn2, axis=1, keepdims=True)) / (2 * half)
    m2 = (jnp.sum(dn1 * h1, axis=1, keepdims=True) + jnp.sum(dn2 * h2, axis=1, keepdims=True)) / (2 * half)
    dx1, dx2 = rstd * (dn1 - m1 - h1 * m2), rstd * (dn2 - m1 - h2 * m2)
    dx_ref[pl.ds(r0, br), pl.ds(c0, half)] = dx1.astype(dx_ref.dtype)
    dx_ref[pl.ds(r0, br), pl.ds(c0 + half, half)] = dx2.astype(dx_ref.dtype)
    part_ref[pl.ds(i, 1), pl.ds(c0, half)] = jnp.sum(dx1, axis=0, keepdims=True)
    part_ref[pl.ds(i, 1), pl.ds(c0 + half, half)] = jnp.sum(dx2, axis=0, keepdims=True)


def _gelu_tanh32(x):
    return 0.5 * x * (1.0 + jnp.tanh(_GELU_C * (x + 0.044715 * x * x * x)))


def _gelu_tanh_grad32(x):
    th = jnp.tanh(_GELU_C * (x + 0.044715 * x * x * x))
    return 0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * _GELU_C * (1.0 + 3 * 0.044715 * x * x)


def _gelu_fwd_kernel(h_ref, bias_ref, o_ref, *, ids=None, br, bc):
    i, j = ids or (pl.program_id(0), pl.program_id(1))
    r0, c0 = i * br, j * bc
    x = _tile(h_ref, r0, c0, br, bc) + bias_ref[pl.ds(0, 1), pl.ds(c0, bc)].astype(jnp.float32)
    o_ref[pl.ds(r0, br), pl.ds(c0, bc)] = _gelu_tanh32(x).astype(o_ref.dtype)


def _gelu_bwd_kernel(h_ref, bias_ref, g_ref, dh_ref, part_ref, *, ids=None, br, bc):
    i, j = ids or (pl.program_id(0), pl.program_id(1))
    r0, c0 = i * br, j * bc
    x = _tile(h_ref, r0, c0, br, bc) + bias_ref[pl.ds(0, 1), pl.ds(c0, bc)].astype(jnp.float32)
    dh = (_tile(g_ref, r0, c0, br, bc) * _gelu_tanh_grad32(x)).astype(dh_ref.dtype)
    dh_ref[pl.ds(r0, br), pl.ds(c0, bc)] = dh
    part_ref[pl.ds(i, 1), pl.ds(c0, bc)] = jnp.sum(dh.astype(jnp.float32), axis=0, keepdims=True)


def _call(kernel, ins, outs, grid, interpret):
    """`pallas_tiles.tiled_call` with the environment's tuning knobs (`GLM_JAX_K_WARPS`, `GLM_JAX_K_ORDER`)."""
    return tiled_call(kernel, ins, outs, grid, interpret=interpret or _interpret(),
                      num_warps=int(os.environ.get("GLM_JAX_K_WARPS", "4")),
                      rows_first=os.environ.get("GLM_JAX_K_ORDER", "cols") == "rows")


def _partials_to_streams(part: jax.Array, batch: int, k: int) -> jax.Array:
    """`[blocks * 2k, D]` partials (text, all for each of `k` quantities) -> `[k, B, 2, D]` (text, image)."""
    p = part.reshape(batch, -1, 2 * k, part.shape[-1]).sum(axis=1)
    txt, tot = p[:, 0::2], p[:, 1::2]
    return jnp.stack([txt, tot - txt], axis=2).transpose(1, 0, 2, 3)


def _f32(shape):
    return jax.ShapeDtypeStruct(shape, jnp.float32)


_MOD_FWD_ROWS, _MOD_FWD_BC = 8, 512


def modulate_kernel(x_BLD, shift_B2D, scale_B2D, t, *, interpret=False):
    """`(u, mean, rstd)` of `modulate_split` by the Pallas kernel (whole rows per program)."""
    b, length, d = x_BLD.shape
    rows, br = b * length, _mod_fwd_rows()
    kern = partial(_modulate_fwd_kernel, t=t, length=length, br=br, bc=_MOD_FWD_BC, d=d)
    dt = x_BLD.dtype
    u, st = _call(kern, (x_BLD.reshape(rows, d), shift_B2D.astype(dt).reshape(2 * b, d),
                         scale_B2D.astype(dt).reshape(2 * b, d)),
                  (jax.ShapeDtypeStruct((rows, d), dt), _f32((rows, 2))), (rows // br, 1), interpret)
    st = st.reshape(b, length, 2)
    return u.reshape(b, length, d), st[..., :1], st[..., 1:]


def _mod_fwd_rows() -> int:
    return int(os.environ.get("GLM_JAX_K_FROWS", str(_MOD_FWD_ROWS)))


def _modulate_fwd_kernel_ok(length: int, d: int) -> bool:
    return (_kernels_on() and os.environ.get("GLM_JAX_K_MODFWD") != "0"
            and length % _mod_fwd_rows() == 0 and d % _MOD_FWD_BC == 0)


def gate_backward_kernel(g_BLD, f_BLD, bias_D, gate_B2D, t, *, interpret=False):
    """`(g * gate_s, sum_s(g * (f + b)), sum_s(g))` by the Pallas kernel; shapes as in `gated_residual`."""
    b, length, d = g_BLD.shape
    bc = _mod_bc()
    br, rows = _block_rows(length, d, bc, most=16), b * length
    kern = partial(_gate_kernel, t=t, length=length, br=br, bc=bc)
    outs = (jax.ShapeDtypeStruct((rows, d), f_BLD.dtype), _f32((rows // br * 4, d)))
    df, part = _call(kern, (g_BLD.reshape(rows, d), f_BLD.reshape(rows, d), bias_D.reshape(1, d),
                            gate_B2D.reshape(2 * b, d)), outs, (rows // br, d // bc), interpret)
    gf, gs = _partials_to_streams(part, b, 2)
    return df.reshape(b, length, d), gf, gs


def modulate_backward_kernel(du_BLD, x_BLD, g_BLD, stats_BL4, sp_B2D, t, *, interpret=False):
    """`(dx, sum_s(du), sum_s(du * h))` by the Pallas kernel; `stats_BL4` = mean, rstd, mean(dh), mean(dh * h)."""
    b, length, d = x_BLD.shape
    bc = _mod_bc()
    br, rows = _block_rows(length, d, bc, most=16), b * length
    kern = partial(_mod_kernel, t=t, length=length, br=br, bc=bc)
    outs = (jax.ShapeDtypeStruct((rows, d), x_BLD.dtype), _f32((rows // br * 4, d)))
    dx, part = _call(kern, (du_BLD.reshape(rows, d), x_BLD.reshape(rows, d), g_BLD.reshape(rows, d),
                            stats_BL4.reshape(rows, 4), sp_B2D.reshape(2 * b, d)), outs,
                     (rows // br, d // bc), interpret)
    dshift, dscale = _partials_to_streams(part, b, 2)
    return dx.reshape(b, length, d), dshift, dscale


def norm_rope_kernel(y_BLD, bias_D, cos_LK, sin_LK, *, interpret=False):
    b, length, d = y_BLD.shape
    k = cos_LK.shape[-1]
    br, rows = _block_rows(length, d, k, most=8), b * length
    kern = partial(_norm_rope_fwd_kernel, length=length, br=br, half=k // 2)
    out = _call(kern, (y_BLD.reshape(rows, d), bias_D.reshape(1, d), cos_LK, sin_LK),
                jax.ShapeDtypeStruct((rows, d), y_BLD.dtype), (rows // br, d // k), interpret)
    return out.reshape(b, length, d)


def norm_rope_backward_kernel(y_BLD, bias_D, cos_LK, sin_LK, g_BLD, *, interpret=False):
    b, length, d = y_BLD.shape
    k = cos_LK.shape[-1]
    br, rows = _block_rows(length, d, k, most=8), b * length
    kern = partial(_norm_rope_bwd_kernel, length=length, br=br, half=k // 2)
    outs = (jax.ShapeDtypeStruct((rows, d), y_BLD.dtype), _f32((rows // br, d)))
    dx, part = _call(kern, (y_BLD.reshape(rows, d), bias_D.reshape(1, d), cos_LK, sin_LK, g_BLD.reshape(rows, d)),
                     outs, (rows // br, d // k), interpret)
    return dx.reshape(b, length, d), part.sum(0)


_GELU_BC = 256


def gelu_kernel(h_BLF, bias_F, *, interpret=False):
    b, length, f = h_BLF.shape
    br, rows = _block_rows(length, f, _GELU_BC, most=16), b * length
    kern = partial(_gelu_fwd_kernel, br=br, bc=_GELU_BC)
    out = _call(kern, (h_BLF.reshape(rows, f), bias_F.reshape(1, f)), jax.ShapeDtypeStruct((rows, f), h_BLF.dtype),
                (rows // br, f // _GELU_BC), interpret)
    return out.reshape(b, length, f)


def gelu_backward_kernel(h_BLF, bias_F, g_BLF, *, interpret=False):
    b, length, f = h_BLF.shape
    br, rows = _block_rows(length, f, _GELU_BC, most=16), b * length
    kern = partial(_gelu_bwd_kernel, br=br, bc=_GELU_BC)
    outs = (jax.ShapeDtypeStruct((rows, f), h_BLF.dtype), _f32((rows // br, f)))
    dh, part = _call(kern, (h_BLF.reshape(rows, f), bias_F.reshape(1, f), g_BLF.reshape(rows, f)), outs,
                     (rows // br, f // _GELU_BC), interpret)
    return dh.reshape(b, length, f), part.sum(0)


# ------------------------------------------------------------------------------------------------ the ops


def gated_residual(x_BLD: jax.Array, f_BLD: jax.Array, bias_D: jax.Array, gate_B2D: jax.Array, t: int) -> jax.Array:
    """`x + gate_s * (f + bias)`, with the gate of each position's stream (`gate_B2D[:, 0]` text, `[:, 1]` image);
    `f + bias` is rounded to the dtype of `f` first, as the projection's own bias add would.

    With the kernels: a hand-written backward pass (one kernel: `dF`, `dgate_s`, the bias sum; the cotangent of
    `x` is passed on as it is). Without them: the plain formula, differentiated by JAX."""
    if _use_kernels(x_BLD.shape[1], x_BLD.shape[2], _mod_bc()):
        return _gated_residual_op(x_BLD, f_BLD, bias_D, gate_B2D, t)
    return _gated_residual_plain(x_BLD, f_BLD, bias_D, gate_B2D, t)


def _gated_residual_plain(x, f, bias, gate, t):
    return x + (f + bias.astype(f.dtype)) * _select(gate, t, x.shape[1]).astype(f.dtype)


@partial(jax.custom_vjp, nondiff_argnums=(4,))
def _gated_residual_op(x, f, bias, gate, t):
    return _gated_residual_plain(x, f, bias, gate, t)


def _gated_residual_fwd(x, f, bias, gate, t):
    return _gated_residual_plain(x, f, bias, gate, t), (f, bias, gate)


def _gated_residual_bwd(t, res, g):
    f, bias, gate = res
    df, dgate, gsum = per_device(lambda *a: gate_backward_kernel(*a, t), (g, f, bias, gate),
                                  (True, True, False, True), ("batch",) * 3)
    dbias = jnp.sum(gsum * gate.astype(jnp.float32), axis=(0, 1))
    return g, df, dbias.astype(bias.dtype), dgate.astype(gate.dtype)


_gated_residual_op.defvjp(_gated_residual_fwd, _gated_residual_bwd)


def modulate_split(x_BLD: jax.Array, shift_B2D: jax.Array, scale_B2D: jax.Array, t: int
                   ) -> tuple[jax.Array, jax.Array]:
    """`(LN(x) * (1 + scale_s) + shift_s, x)`: the modulated input of a sub-layer and the residual path.

    LayerNorm without affine parameters, statistics in float32 (eps 1e-5), the normalised input rounded to the
    dtype of `x` before the modulation (as torch's LayerNorm output is). With the kernels: a whole-row forward
    kernel and a hand-written backward pass, which adds the residual path's cotangent (the second output's) in
    the same pass. Without them: the plain formula, differentiated by JAX."""
    if _use_kernels(x_BLD.shape[1], x_BLD.shape[2], _mod_bc()):
        return _modulate_op(x_BLD, shift_B2D, scale_B2D, t)
    return _modulate_plain(x_BLD, shift_B2D, scale_B2D, t)[0]


def _modulate_plain(x, shift, scale, t):
    """`((u, x), (mean, rstd))` by plain JAX."""
    length = x.shape[1]
    x32 = x.astype(jnp.float32)
    mean, rstd = ln_stats(x32, LN_EPS)
    h = ((x32 - mean) * rstd).astype(x.dtype)
    u = h * (1 + _select(scale, t, length).astype(x.dtype)) + _select(shift, t, length).astype(x.dtype)
    return (u, x), (mean, rstd)


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def _modulate_op(x, shift, scale, t):
    return _modulate_fwd(x, shift, scale, t)[0]


def _modulate_fwd(x, shift, scale, t):
    length, d = x.shape[1], x.shape[2]
    if _modulate_fwd_kernel_ok(length, d):
        u, mean, rstd = per_device(lambda *a: modulate_kernel(*a, t), (x, shift, scale), (True,) * 3,
                                    ("batch",) * 3)
        out = (u, x)
    else:
        out, (mean, rstd) = _modulate_plain(x, shift, scale, t)
    return out, (x, mean, rstd, shift, scale)


def _modulate_bwd(t, res, cts):
    x, mean, rstd, shift, scale = res
    du, g = cts
    sp = 1 + scale.astype(jnp.float32)
    h = (x.astype(jnp.float32) - mean) * rstd
    # the row statistics of the LayerNorm backward, mean(dh) and mean(dh * h) with dh = du * (1 + scale_s) (an
    # XLA row reduction; the rest is one kernel pass). Each row is reduced against both streams' (1 + scale) and
    # the sums picked per row afterwards, so that the reduction's input does not depend on `t` (`_select`); it is
    # memory-bound, the extra products are free.
    du32 = du.astype(jnp.float32)
    txt = _text_rows(t, x.shape[1])
    a, c = (jnp.where(txt, jnp.mean(v * sp[:, :1], -1, keepdims=True), jnp.mean(v * sp[:, 1:], -1, keepdims=True))
            for v in (du32, du32 * h))
    stats = jnp.concatenate([mean, rstd, a, c], -1)
    dx, dshift, dscale = per_device(lambda *a: modulate_backward_kernel(*a, t), (du, x, g, stats, sp),
                                     (True,) * 5, ("batch",) * 3)
    return dx, dshift.astype(shift.dtype), dscale.astype(scale.dtype)


_modulate_op.defvjp(_modulate_fwd, _modulate_bwd)


def _rotate_half(x: jax.Array) -> jax.Array:
    """`[-x[K/2:], x[:K/2]]` (diffusers' `use_real_unbind_dim=-2` rotation)."""
    a, b = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-b, a], axis=-1)


def _rotate_half_t(y: jax.Array) -> jax.Array:
    """Transpose of `_rotate_half`: `[y2, -y1]`."""
    a, b = jnp.split(y, 2, axis=-1)
    return jnp.concatenate([b, -a], axis=-1)


def _heads(x_BLD, k):
    b, length, d = x_BLD.shape
    return x_BLD.reshape(b, length, d // k, k)


@jax.custom_vjp
def qk_norm_rope(y_BLD: jax.Array, bias_D: jax.Array, cos_LK: jax.Array, sin_LK: jax.Array) -> jax.Array:
    """Per-head LayerNorm (no affine, over the `K = cos_LK.shape[-1]` features of each head) of `y + bias`, then
    the 2-D RoPE `x cos + [-x[K/2:], x[:K/2]] sin`, in float32, one rounding to the dtype of `y` at the end
    (torch also rounds the normalised heads before the RoPE; XLA's default excess precision drops that rounding
    in the plain composition too). `y_BLD` is the projection without its bias, `[B, L, heads * K]`.

    The backward pass keeps `y` (not the float32 normalised heads), recomputes the statistics and writes the
    input gradient and the bias gradient's partial sums in one pass. RoPE tables are constants: their
    cotangent is zero."""
    return _qk_fwd(y_BLD, bias_D, cos_LK, sin_LK)[0]


def _qk_fwd(y, bias, cos, sin):
    length, d = y.shape[1], y.shape[2]
    k = cos.shape[-1]
    if _use_kernels(length, d, k):
        out, = per_device(lambda *a: (norm_rope_kernel(*a),), (y, bias, cos, sin), (True, False, False, False),
                           ("batch",))
    else:
        x32 = _heads(y.astype(jnp.float32) + bias.astype(y.dtype).astype(jnp.float32), k)
        mean, rstd = jax.lax.optimization_barrier(ln_stats(x32, LN_EPS))
        xc = x32 - mean
        c, s_ = cos[None, :, None, :], sin[None, :, None, :]
        out = (rstd * (xc * c + _rotate_half(xc) * s_)).astype(y.dtype).reshape(y.shape)
    return out, (y, bias, cos, sin)


def _qk_bwd(res, g):
    y, bias, cos, sin = res
    length, d = y.shape[1], y.shape[2]
    k = cos.shape[-1]
    if _use_kernels(length, d, k):
        dx, dbias = per_device(norm_rope_backward_kernel, (y, bias, cos, sin, g), (True, False, False, False, True),
                                ("batch", "sum"))
    else:
        x32 = _heads(y.astype(jnp.float32) + bias.astype(y.dtype).astype(jnp.float32), k)
        mean, rstd = ln_stats(x32, LN_EPS)
        c, s_ = cos[None, :, None, :], sin[None, :, None, :]
        g32 = _heads(g.astype(jnp.float32), k)
        dn = g32 * c + _rotate_half_t(g32 * s_)                      # through the RoPE
        xhat = (x32 - mean) * rstd                                   # through the LayerNorm
        s1, s2 = jax.lax.optimization_barrier((jnp.mean(dn, axis=-1, keepdims=True),
                                               jnp.mean(dn * xhat, axis=-1, keepdims=True)))
        dx32 = (rstd * (dn - s1 - xhat * s2)).reshape(y.shape)
        dx, dbias = dx32.astype(y.dtype), jnp.sum(dx32, axis=(0, 1))
    return dx, dbias.astype(bias.dtype), jnp.zeros_like(cos), jnp.zeros_like(sin)


qk_norm_rope.defvjp(_qk_fwd, _qk_bwd)


@jax.custom_vjp
def bias_gelu(h_BLF: jax.Array, bias_F: jax.Array) -> jax.Array:
    """The FF's tanh GELU of `h + bias` (`h` the first projection without its bias), evaluated in float32 and
    cast back to the dtype of `h`.

    The backward pass keeps only `h` (in the compute dtype) and recomputes the derivative from it; plain
    autodiff of the float32 formula would keep a float32 `tanh` of the whole `[tokens, ff_dim]` activation
    (4x the bytes of `h` in bf16). It writes the input gradient and the bias gradient's partial sums in one
    pass."""
    return _gelu_fwd(h_BLF, bias_F)[0]


def _gelu_fwd(h, bias):
    length, f = h.shape[1], h.shape[2]
    if _use_kernels(length, f, _GELU_BC):
        out, = per_device(lambda *a: (gelu_kernel(*a),), (h, bias), (True, False), ("batch",))
    else:
        out = _gelu_tanh32((h + bias.astype(h.dtype)).astype(jnp.float32)).astype(h.dtype)
    return out, (h, bias)


def _gelu_bwd(res, g):
    h, bias = res
    length, f = h.shape[1], h.shape[2]
    if _use_kernels(length, f, _GELU_BC):
        dh, dbias = per_device(gelu_backward_kernel, (h, bias, g), (True, False, True), ("batch", "sum"))
    else:
        x = (h + bias.astype(h.dtype)).astype(jnp.float32)
        dh = (g.astype(jnp.float32) * _gelu_tanh_grad32(x)).astype(h.dtype)
        dbias = jnp.sum(dh, axis=(0, 1), dtype=jnp.float32)
    return dh, dbias.astype(bias.dtype)


bias_gelu.defvjp(_gelu_fwd, _gelu_bwd)
