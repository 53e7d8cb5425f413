"""A Hopper matmul in Pallas' Mosaic GPU backend, for `benchmarks/mgpu_matmul_probe.py` (not used by the models).

`gemm(a, b, a_t=, b_t=)` computes `a @ b` with either operand read transposed (`a^T` from `a [K, M]`, `b^T`
from `b [N, K]`), float32 accumulation, the result rounded to the operands' dtype. The kernel is persistent
and warp-specialised: each CTA walks output tiles of `2 TM x TN` in bands of `width` row blocks (so that the
CTAs running together share operand tiles in L2); one warpgroup streams `TK`-wide slices of both operands into
shared memory through TMA, `STEPS` slices ahead, and two compute warpgroups each accumulate `TM` rows of the
tile with `wgmma`, then store it through shared memory and TMA.

Timed alone, back to back, it beat XLA's cuBLAS call by 6.6-7.9% on three of the DiT block's nine training-step
matmuls on one card and lost on one of them by 9.5% on another; inside the training step it did not win
(RESULTS.md, "tried and not kept").
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

TM, TN, TK = 128, 128, 64   # rows per compute warpgroup, tile columns, contraction slice
STEPS = 3                   # contraction slices in flight
EPI = 64                    # columns stored per epilogue step


def supported(m: int, n: int, k: int, dtype) -> bool:
    """Whether an `[m, k] x [k, n]` product tiles into the kernel."""
    return (jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
            and m % (2 * TM) == 0 and n % TN == 0 and k % TK == 0 and k >= 2 * TK)


def _band_order(step, m_iters: int, n_iters: int, width: int):
    """Output tile `(row block, column block)` of a CTA's `step`-th tile: bands of `width` row blocks (fewer
    in the last band), each walked one column at a time."""
    band = step // (width * n_iters)
    first = band * width
    rows = jnp.minimum(m_iters - first, width)
    r = step % (width * n_iters)
    return first + r % rows, r // rows


def _kernel(a_gmem, b_gmem, o_gmem, *, a_t: bool, b_t: bool, width: int):
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    k, m = a_gmem.shape if a_t else a_gmem.shape[::-1]
    n = b_gmem.shape[0] if b_t else b_gmem.shape[1]
    m_iters, n_iters, k_iters = m // (2 * TM), n // TN, k // TK
    swz = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    a_spec = (plgpu.BlockSpec((TK, 2 * TM), lambda kk: (kk, 0), transforms=swz) if a_t
              else plgpu.BlockSpec((2 * TM, TK), lambda kk: (0, kk), transforms=swz))
    b_spec = (plgpu.BlockSpec((TN, TK), lambda kk: (0, kk), transforms=swz) if b_t
              else plgpu.BlockSpec((TK, TN), lambda kk: (kk, 0), transforms=swz))

    def pipeline(body, context):
        return plgpu.emit_pipeline_warp_specialized(
            body, grid=(k_iters,), memory_registers=40, in_specs=[a_spec, b_spec], wg_axis="wg",
            num_compute_wgs=2, max_concurrent_steps=STEPS, compute_context=context)

    noop = lambda *_, **__: None

    @partial(pl.run_scoped, allocs=pipeline(noop, noop).get_allocations(a_gmem, b_gmem),
             out_smem=plgpu.SMEM((2, 2, TM, EPI), o_gmem.dtype, transforms=swz), collective_axes="wg")
    def _scope(allocs, out_smem):
        wg = lax.axis_index("wg")

        @plgpu.nd_loop((m_iters * n_iters,), collective_axes="sm")
        def _tiles(info):
            (step,) = info.index
            mi, ni = _band_order(step, m_iters, n_iters, width)
            rows = pl.ds(mi * (2 * TM) + wg * TM, TM)

            def context(run):
                @partial(pl.run_scoped, acc_ref=plgpu.ACC((TM, TN), jnp.float32))
                def _acc(acc_ref):
                    run(acc_ref)
                    acc = acc_ref[...]
                    for j in range(TN // EPI):
                        slot = out_smem.at[wg, j % 2]
                        plgpu.wait_smem_to_gmem(1, wait_read_only=True)   # this slot's last store has read it
                        slot[...] = acc[:, j * EPI:(j + 1) * EPI].astype(o_gmem.dtype)
                        plgpu.commit_smem()
                        plgpu.copy_smem_to_gmem(slot, o_gmem.at[rows, pl.ds(ni * TN + j * EPI, EPI)])

            def body(_, a_smem, b_smem, acc_ref):
                a_op = (plgpu.transpose_ref(a_smem.at[:, pl.ds(wg * TM, TM)], (1, 0)) if a_t
                        else a_smem.at[pl.ds(wg * TM, TM)])
                b_op = plgpu.transpose_ref(b_smem, (1, 0)) if b_t else b_smem
                plgpu.wgmma(acc_ref, a_op, b_op)
                plgpu.wgmma_wait(0)
                return acc_ref

            a_view = (a_gmem.at[:, pl.ds(mi * (2 * TM), 2 * TM)] if a_t
                      else a_gmem.at[pl.ds(mi * (2 * TM), 2 * TM), :])
            b_view = b_gmem.at[pl.ds(ni * TN, TN), :] if b_t else b_gmem.at[:, pl.ds(ni * TN, TN)]
            pipeline(body, context)(a_view, b_view, allocations=allocs)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def _num_sms() -> int:
    dev = jax.devices()[0]
    return dev.core_count if dev.platform == "gpu" else 132


def gemm(a: jax.Array, b: jax.Array, *, a_t: bool = False, b_t: bool = False, width: int = 4) -> jax.Array:
    """`op(a) @ op(b)` on a Hopper GPU, `op` the transpose where `a_t` / `b_t`; float32 accumulation, the result
    in the operands' dtype. The shapes must be `supported`."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    if a.dtype != b.dtype:
        raise ValueError(f"gemm: operand dtypes differ ({a.dtype} and {b.dtype})")
    k, m = a.shape if a_t else a.shape[::-1]
    n, k2 = b.shape if b_t else b.shape[::-1]
    if k != k2 or not supported(m, n, k, a.dtype):
        raise ValueError(f"gemm: shapes {a.shape} (a_t={a_t}) and {b.shape} (b_t={b_t}) do not tile "
                         f"(need m % {2 * TM}, n % {TN}, k % {TK} == 0, k >= {2 * TK}, 16-bit floats)")
    call = plgpu.kernel(partial(_kernel, a_t=a_t, b_t=b_t, width=width),
                        out_type=jax.ShapeDtypeStruct((m, n), a.dtype), grid=(_num_sms(),), grid_names=("sm",),
                        num_threads=3, thread_name="wg")
    return call(a, b)
