"""One-token attention over the AR's KV cache as a split-K ("flash decoding") Pallas (Triton) kernel.

At a decode step each sequence has one query per head and a cache of `S` slots, of which only `[start, stop)` are
filled (`start`: the first valid slot of a left-padded prompt, `stop`: the current index + 1). The kernel runs one
program per (sequence, KV head, block of 128 slots): the `G` query heads that share the KV head attend to the
block's valid slots, and the program writes its unnormalised output with its row maximum and sum of exponentials
(float32). Blocks outside `[start, stop)` read nothing. The blocks are merged afterwards by the usual rescaling,

    m = max_j m_j,   o = sum_j exp(m_j - m) o_j / sum_j exp(m_j - m) l_j,

so a step reads only the filled part of the cache, where the plain form (`ar.decode_attention`) reads all of it.
Scores and softmax are float32; the probabilities are rounded to the cache's dtype for the `p v` product as in
the plain form. Float32 inputs are multiplied at full float32 precision (no TF32).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from glm_jax.models.pallas_tiles import triton_params

BLOCK = 128                   # cache slots per program
_MIN = -1e30                  # finite "minus infinity": empty blocks must not produce inf - inf


def _block_kernel(q_ref, k_ref, v_ref, start_ref, stop_ref, o_ref, m_ref, l_ref, *, scale, block, precision):
    j = pl.program_id(1)
    lo = j * block
    start, stop = start_ref[()], stop_ref[()]
    active = (lo < stop) & (lo + block > start)

    @pl.when(active)
    def _():
        q = q_ref[...]                                                   # [G, D]
        k = k_ref[...]                                                   # [block, D]
        s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32,
                                precision=precision) * scale             # [G, block]
        slot = lo + jnp.arange(block)
        valid = ((slot >= start) & (slot < stop))[None, :]
        s = jnp.where(valid, s, _MIN)
        m = jnp.max(s, axis=1)
        p = jnp.where(valid, jnp.exp(s - m[:, None]), 0.0)
        v = v_ref[...]
        o_ref[...] = jax.lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                                         preferred_element_type=jnp.float32, precision=precision)
        m_ref[...] = m
        l_ref[...] = jnp.sum(p, axis=1)

    @pl.when(jnp.logical_not(active))
    def _():
        o_ref[...] = jnp.zeros(o_ref.shape, jnp.float32)
        m_ref[...] = jnp.full(m_ref.shape, _MIN, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)


def decode_attention_blocks(q_BKGD: jax.Array, k_BKSD: jax.Array, v_BKSD: jax.Array, start_B: jax.Array,
                            stop: jax.Array, scale: float, *, interpret: bool = False) -> jax.Array:
    """Attention of `q [B, K, G, D]` (G query heads per KV head) over the slots `[start_b, stop)` of the cache
    `k, v [B, K, S, D]`, `S` a multiple of `BLOCK`; returns `[B, K, G, D]` in the dtype of `q`. `G` is padded to
    16 rows inside (the smallest Triton matrix tile)."""
    b, kv, g, d = q_BKGD.shape
    slots = k_BKSD.shape[2]
    if slots % BLOCK:
        raise ValueError(f"decode attention kernel: the cache needs a multiple of {BLOCK} slots, got {slots}")
    gp = max(16, 1 << (g - 1).bit_length())
    rows, blocks = b * kv, slots // BLOCK
    q = jnp.pad(q_BKGD, ((0, 0), (0, 0), (0, gp - g), (0, 0))).reshape(rows, gp, d)
    k = k_BKSD.reshape(rows, slots, d)
    v = v_BKSD.reshape(rows, slots, d)
    start = jnp.repeat(jnp.asarray(start_B, jnp.int32), kv)
    stop = jnp.broadcast_to(jnp.asarray(stop, jnp.int32), (rows,))
    precision = jax.lax.Precision.HIGHEST if q.dtype == jnp.float32 else jax.lax.Precision.DEFAULT
    kern = partial(_block_kernel, scale=float(scale), block=BLOCK, precision=precision)
    o, m, l_ = pl.pallas_call(
        kern, grid=(rows, blocks),
        in_specs=[pl.BlockSpec((None, gp, d), lambda r, j: (r, 0, 0)),
                  pl.BlockSpec((None, BLOCK, d), lambda r, j: (r, j, 0)),
                  pl.BlockSpec((None, BLOCK, d), lambda r, j: (r, j, 0)),
                  pl.BlockSpec((None,), lambda r, j: (r,)),
                  pl.BlockSpec((None,), lambda r, j: (r,))],
        out_specs=[pl.BlockSpec((None, None, gp, d), lambda r, j: (r, j, 0, 0)),
                   pl.BlockSpec((None, None, gp), lambda r, j: (r, j, 0)),
                   pl.BlockSpec((None, None, gp), lambda r, j: (r, j, 0))],
        out_shape=[jax.ShapeDtypeStruct((rows, blocks, gp, d), jnp.float32),
                   jax.ShapeDtypeStruct((rows, blocks, gp), jnp.float32),
                   jax.ShapeDtypeStruct((rows, blocks, gp), jnp.float32)],
        interpret=interpret, name="glm_decode_attention",
        **triton_params(interpret, num_warps=4, num_stages=2))(q, k, v, start, stop)
    m_all = jnp.max(m, axis=1, keepdims=True)
    w = jnp.exp(m - m_all)                                               # [rows, blocks, gp]; 0 for empty blocks
    out = jnp.sum(w[..., None] * o, axis=1) / jnp.sum(w * l_, axis=1)[..., None]
    return out[:, :g].reshape(b, kv, g, d).astype(q_BKGD.dtype)
