"""The DiT FF's first projection with its tanh GELU in the matmul's epilogue (Mosaic GPU kernels, Hopper).

The block FF is `F(u) = gelu(u W1 + b1) W2`. Done as separate kernels, the GELU costs a pass over the
`[tokens, ff_dim]` activation forward (read the matmul's output, write the GELU's) and one backward (read the
saved pre-activation and the cotangent from `W2`'s data-gradient matmul, write the pre-activation's gradient);
at 1024² that is 3 x 142 MB and 5 x 142 MB of memory traffic per block. Here:

* `gemm_bias_gelu(u, W1, b1) -> (p, a)`: one matmul whose epilogue adds the bias and writes both the
  pre-activation `p = u W1 + b1` (kept for the backward pass) and the activation `a = gelu(p)`;
* `gemm_gelu_grad(g, W2, p) -> (dp, db1_partials)`: the data-gradient matmul `g W2^T` whose epilogue
  multiplies by `gelu'(p)` (the tile of `p` is fetched while the matmul runs) and writes the bias gradient's
  column sums per row block.

Both are persistent, warp-specialised kernels: one warpgroup streams `TK`-wide slices of the operands into
shared memory through TMA, two compute warpgroups each own `TM` rows of a `2 TM x TN` output tile and run
`wgmma` into a float32 accumulator, then the epilogue. Shapes must tile exactly (`supported`); the caller falls
back to XLA's matmul and the separate GELU kernels otherwise. The arithmetic is float32 throughout (bias add,
`tanh` GELU and its derivative), the outputs are rounded once to the operands' dtype.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

TM, TN, TK = 128, 128, 64   # rows per compute warpgroup, columns per tile, contraction slice
EPI = 64                    # epilogue column slice
_C = math.sqrt(2.0 / math.pi)


def supported(m: int, n: int, k: int, dtype) -> bool:
    """Whether an `[m, k] x [k, n]` product tiles into these kernels."""
    return (jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
            and m % (2 * TM) == 0 and n % TN == 0 and k % TK == 0 and k // TK >= 2)


def _gelu(x):
    return 0.5 * x * (1.0 + jnp.tanh(_C * (x + 0.044715 * x * x * x)))


def _gelu_grad(x):
    th = jnp.tanh(_C * (x + 0.044715 * x * x * x))
    return 0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * _C * (1.0 + 3 * 0.044715 * x * x)


def _num_sms() -> int:
    return jax.devices()[0].core_count if jax.devices()[0].platform == "gpu" else 132


def _tile_order(lin, m_iters: int, n_iters: int, width: int = 4):
    """Output tile of the `lin`-th step: bands of `width` row blocks, walked column by column, so that
    the programs running together share operand tiles in L2."""
    band = width * n_iters
    g = lin // band
    first = g * width
    rows = jnp.minimum(m_iters - first, width)
    r = lin % band
    return first + r % rows, r // rows


def _kernel(*refs, mode: str, b_t: bool, steps: int, cwg: int, a_t: bool = False, width: int = 4):
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    if mode == "none":
        (a_gmem, b_gmem, *outs), x_gmem = refs, None
    else:
        a_gmem, b_gmem, x_gmem, *outs = refs
    k, m = a_gmem.shape if a_t else a_gmem.shape[::-1]
    n = b_gmem.shape[0] if b_t else b_gmem.shape[1]
    m_iters, n_iters, k_iters = m // (cwg * TM), n // TN, k // TK
    dtype = a_gmem.dtype
    tfm = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    b_spec = (plgpu.BlockSpec((TN, TK), lambda kk: (0, kk), transforms=tfm) if b_t
              else plgpu.BlockSpec((TK, TN), lambda kk: (kk, 0), transforms=tfm))

    a_spec = (plgpu.BlockSpec((TK, cwg * TM), lambda kk: (kk, 0), transforms=tfm) if a_t
              else plgpu.BlockSpec((cwg * TM, TK), lambda kk: (0, kk), transforms=tfm))

    def make_pipeline(body, context):
        return plgpu.emit_pipeline_warp_specialized(
            body, grid=(k_iters,), memory_registers=40,
            in_specs=[a_spec, b_spec],
            wg_axis="wg", num_compute_wgs=cwg, max_concurrent_steps=steps, compute_context=context)

    noop = lambda *_, **__: None
    if mode in ("bias_gelu", "none"):
        scratch = dict(
            out_smem=plgpu.SMEM((cwg, 2, TM, EPI), dtype, transforms=tfm),   # [wg, slot]
            vec_smem=plgpu.SMEM((cwg, TN), jnp.float32),                      # the bias slice, per wg
            bar=plgpu.Barrier(num_barriers=cwg))
    else:
        scratch = dict(
            out_smem=plgpu.SMEM((cwg, TM, TN), dtype, transforms=tfm),        # p, then dp, per wg
            vec_smem=plgpu.SMEM((cwg, TN), jnp.float32),                      # column sums, per wg
            bar=plgpu.Barrier(num_barriers=cwg))

    @functools.partial(pl.run_scoped, allocs=make_pipeline(noop, noop).get_allocations(a_gmem, b_gmem),
                       collective_axes="wg", **scratch)
    def _scope(allocs, out_smem, vec_smem, bar):
        wg = lax.axis_index("wg")

        @plgpu.nd_loop((m_iters * n_iters,), collective_axes="sm")
        def _tiles(info):
            (lin,) = info.index
            mi, ni = _tile_order(lin, m_iters, n_iters, width)
            rows = pl.ds(mi * (cwg * TM) + wg * TM, TM)
            cols = pl.ds(ni * TN, TN)

            def context(run):
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)   # the last tile's stores have read smem
                if mode == "bias_gelu":
                    plgpu.copy_gmem_to_smem(x_gmem.at[cols], vec_smem.at[wg], bar.at[wg])
                elif mode == "gelu_grad":
                    plgpu.copy_gmem_to_smem(x_gmem.at[rows, cols], out_smem.at[wg], bar.at[wg])

                @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((TM, TN), jnp.float32))
                def _acc(acc_ref):
                    run(acc_ref)
                    acc = acc_ref[...]
                    if mode != "none":
                        plgpu.barrier_wait(bar.at[wg])
                    if mode == "none":
                        _epilogue_store(acc, out_smem.at[wg], outs, rows, cols)
                    elif mode == "bias_gelu":
                        _epilogue_bias_gelu(acc, vec_smem.at[wg], out_smem.at[wg], outs, rows, cols)
                    else:
                        _epilogue_gelu_grad(acc, out_smem.at[wg], vec_smem.at[wg], outs, rows, cols,
                                            mi * cwg + wg)

            def body(_, a_smem, b_smem, acc_ref):
                b_op = plgpu.transpose_ref(b_smem, (1, 0)) if b_t else b_smem
                a_op = (plgpu.transpose_ref(a_smem.at[:, pl.ds(wg * TM, TM)], (1, 0)) if a_t
                        else a_smem.at[pl.ds(wg * TM, TM)])
                plgpu.wgmma(acc_ref, a_op, b_op)
                plgpu.wgmma_wait(0)
                return acc_ref

            b_view = b_gmem.at[cols, :] if b_t else b_gmem.at[:, cols]
            a_view = (a_gmem.at[:, pl.ds(mi * (cwg * TM), cwg * TM)] if a_t
                      else a_gmem.at[pl.ds(mi * (cwg * TM), cwg * TM), :])
            make_pipeline(body, context)(a_view, b_view,
                                         allocations=allocs)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def _epilogue_bias_gelu(acc, bias_smem, out_smem, outs, rows, cols):
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    p_gmem, a_gmem = outs
    slot = 0
    for j in range(TN // EPI):
        b = plgpu.load(bias_smem.at[pl.ds(j * EPI, EPI)], (), layout=plgpu.Layout.WGMMA.reduce(0))
        x = acc[:, j * EPI:(j + 1) * EPI] + lax.broadcast_in_dim(b, (TM, EPI), [1])
        ecols = pl.ds(cols.start + j * EPI, EPI)
        for value, dst in ((x, p_gmem), (_gelu(x), a_gmem)):
            plgpu.wait_smem_to_gmem(1, wait_read_only=True)
            out_smem[slot] = value.astype(out_smem.dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(out_smem.at[slot], dst.at[rows, ecols])
            slot = 1 - slot


def _epilogue_store(acc, out_smem, outs, rows, cols):
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    (o_gmem,) = outs
    for j in range(TN // EPI):
        slot = j % 2
        plgpu.wait_smem_to_gmem(1, wait_read_only=True)
        out_smem[slot] = acc[:, j * EPI:(j + 1) * EPI].astype(out_smem.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(out_smem.at[slot], o_gmem.at[rows, pl.ds(cols.start + j * EPI, EPI)])


def _epilogue_gelu_grad(acc, tile_smem, sums_smem, outs, rows, cols, row_block):
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    dp_gmem, part_gmem = outs
    for j in range(TN // EPI):
        sl = pl.ds(j * EPI, EPI)
        p = plgpu.load(tile_smem.at[:, sl], (), layout=plgpu.Layout.WGMMA).astype(jnp.float32)
        dp = (acc[:, j * EPI:(j + 1) * EPI] * _gelu_grad(p)).astype(tile_smem.dtype)
        tile_smem[:, sl] = dp
        sums_smem[sl] = jnp.sum(dp.astype(jnp.float32), axis=0)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(tile_smem, dp_gmem.at[rows, cols])
    plgpu.copy_smem_to_gmem(sums_smem, part_gmem.at[row_block, cols])


def _call(mode, a, b, x, *, b_t, steps=3, approx=False, cwg=2, per_sm=1, a_t=False, width=4):
    import jax.experimental.pallas.mosaic_gpu as plgpu

    m = a.shape[1] if a_t else a.shape[0]
    n = b.shape[0] if b_t else b.shape[1]
    if mode == "none":
        out_type = (jax.ShapeDtypeStruct((m, n), a.dtype),)
    elif mode == "bias_gelu":
        out_type = (jax.ShapeDtypeStruct((m, n), a.dtype), jax.ShapeDtypeStruct((m, n), a.dtype))
    else:
        out_type = (jax.ShapeDtypeStruct((m, n), a.dtype), jax.ShapeDtypeStruct((m // TM, n), jnp.float32))
    f = plgpu.kernel(functools.partial(_kernel, mode=mode, b_t=b_t, steps=steps, cwg=cwg, a_t=a_t, width=width), out_type=out_type,
                     grid=(_num_sms() * per_sm,), grid_names=("sm",), num_threads=cwg + 1, thread_name="wg",
                     compiler_params=plgpu.CompilerParams(approx_math=approx))
    return f(a, b) if x is None else f(a, b, x)


def gemm(a, b, *, a_t=False, b_t=False, steps: int = 3, cwg: int = 2, per_sm: int = 1, width: int = 4):
    """`a @ b` (`a^T` with `a_t`, `b^T` with `b_t`), rounded to the operands' dtype."""
    return _call("none", a, b, None, a_t=a_t, b_t=b_t, steps=steps, cwg=cwg, per_sm=per_sm, width=width)[0]


def gemm_bias_gelu(u, w1, b1, *, steps: int = 3, approx: bool = False, cwg: int = 2, per_sm: int = 1):
    """`(p, gelu(p))` with `p = u @ w1 + b1`: `u [M, K]`, `w1 [K, N]`, `b1 [N]` (float32 arithmetic)."""
    return _call("bias_gelu", u, w1, b1.astype(jnp.float32), b_t=False, steps=steps, approx=approx, cwg=cwg,
                 per_sm=per_sm)


def gemm_gelu_grad(g, w2, p, *, steps: int = 3, approx: bool = False, cwg: int = 2, per_sm: int = 1):
    """`(dp, db)` with `dp = (g @ w2^T) * gelu'(p)` and `db = sum_rows(dp)`: `g [M, K]`, `w2 [N, K]` (the
    second projection's `[in, out]` weight), `p [M, N]` the saved pre-activation."""
    dp, part = _call("gelu_grad", g, w2, p, b_t=True, steps=steps, approx=approx, cwg=cwg, per_sm=per_sm)
    return dp, part.sum(0)
