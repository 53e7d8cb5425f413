"""A Pallas (Triton) call over a 2-D grid of row x column tiles, shared by the fused ops of the DiT
(`dit_ops`) and the AR's MLP (`ar_ops`); the Triton compile settings and the backend check also serve the AR's
decode kernel (`decode_ops`).

Kernels take their program ids as `ids=(row block, column block)`; the grid is launched column blocks first, so
that neighbouring programs read neighbouring tiles of the same rows. Each family of ops has an environment switch
(`GLM_JAX_DIT_KERNELS`, `GLM_JAX_AR_KERNELS`): `0` runs the plain-JAX formulas, `interpret` runs the kernels in
Pallas' interpreter on any backend (tests); unset, the kernels run on GPU.
"""

from __future__ import annotations

import functools
import importlib
import os
import warnings

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from glm_jax.sharding import tensor_unsplit


def interpreted(switch: str) -> bool:
    """`<switch>=interpret`: the kernels run in Pallas' interpreter, on any backend (tests)."""
    return os.environ.get(switch) == "interpret"


@functools.cache
def triton_available() -> bool:
    """Whether this JAX still has Pallas' Triton backend, which the GPU kernels are written for (jax 0.11
    deprecates it). Without it the plain-JAX paths run (same results, slower), after one warning."""
    try:
        importlib.import_module("jax.experimental.pallas.triton")
    except ImportError as e:
        warnings.warn(f"Pallas' Triton backend is not available in jax {jax.__version__} ({e}): glm_jax's fused "
                      "GPU kernels are off and the plain-JAX formulas run instead", stacklevel=2)
        return False
    return True


def kernels_on(switch: str) -> bool:
    """Whether ops under the environment `switch` run their kernels in the code being traced: on GPU unless
    `<switch>=0` (or this JAX has no Pallas Triton backend), anywhere when interpreted. Under a mesh they run
    per device on the samples it holds (`sharding.per_device`), which needs the activations split by samples
    only: with a `tensor` axis of more than one device the plain-JAX formulas run instead, which the partitioner
    splits."""
    if os.environ.get(switch) == "0":
        return False
    if not interpreted(switch) and (jax.default_backend() != "gpu" or not triton_available()):
        return False
    return tensor_unsplit()


def tile(ref, r0, c0, br: int, bc: int):
    """The `[br, bc]` tile of a 2-D ref at `(r0, c0)`, in float32."""
    return ref[pl.ds(r0, br), pl.ds(c0, bc)].astype(jnp.float32)


def triton_params(interpret: bool, *, num_warps: int, num_stages: int) -> dict:
    """`pallas_call` keyword arguments for a Triton compile with `num_warps` / `num_stages`; none when the call runs
    in Pallas' interpreter."""
    if interpret:
        return {}
    from jax.experimental.pallas import triton as plgpu
    return {"compiler_params": plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)}


def tiled_call(kernel, ins, outs, grid: tuple[int, int], *, interpret: bool, num_warps: int = 4,
               rows_first: bool = False):
    """`pallas_call` of `kernel(*in_refs, *out_refs, ids=(i, j))` over `grid = (row blocks, column blocks)`;
    compiled by Triton with `num_warps` and no software pipelining, or run in Pallas' interpreter."""
    extra = triton_params(interpret, num_warps=num_warps, num_stages=1)
    if rows_first:
        body = lambda *refs: kernel(*refs, ids=(pl.program_id(0), pl.program_id(1)))
        return pl.pallas_call(body, grid=grid, out_shape=outs, interpret=interpret, **extra)(*ins)
    swapped = lambda *refs: kernel(*refs, ids=(pl.program_id(1), pl.program_id(0)))
    return pl.pallas_call(swapped, grid=grid[::-1], out_shape=outs, interpret=interpret, **extra)(*ins)
