"""A Pallas (Triton) call over a 2-D grid of row x column tiles, shared by the fused ops of the DiT
(`dit_ops`) and the AR's MLP (`ar_ops`).

Kernels take their program ids as `ids=(row block, column block)`; the grid is launched column blocks first, so
that neighbouring programs read neighbouring tiles of the same rows.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax.experimental import pallas as pl


def tile(ref, r0, c0, br: int, bc: int):
    """The `[br, bc]` tile of a 2-D ref at `(r0, c0)`, in float32."""
    return ref[pl.ds(r0, br), pl.ds(c0, bc)].astype(jnp.float32)


def tiled_call(kernel, ins, outs, grid: tuple[int, int], *, interpret: bool, num_warps: int = 4,
               rows_first: bool = False):
    """`pallas_call` of `kernel(*in_refs, *out_refs, ids=(i, j))` over `grid = (row blocks, column blocks)`;
    compiled by Triton with `num_warps` and no software pipelining, or run in Pallas' interpreter."""
    extra = {}
    if not interpret:
        from jax.experimental.pallas import triton as plgpu
        extra["compiler_params"] = plgpu.CompilerParams(num_warps=num_warps, num_stages=1)
    if rows_first:
        body = lambda *refs: kernel(*refs, ids=(pl.program_id(0), pl.program_id(1)))
        return pl.pallas_call(body, grid=grid, out_shape=outs, interpret=interpret, **extra)(*ins)
    swapped = lambda *refs: kernel(*refs, ids=(pl.program_id(1), pl.program_id(0)))
    return pl.pallas_call(swapped, grid=grid[::-1], out_shape=outs, interpret=interpret, **extra)(*ins)
