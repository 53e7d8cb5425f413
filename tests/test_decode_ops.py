"""The AR's split-K decode-attention kernel (`glm_jax.models.decode_ops`), in Pallas' interpreter on CPU and compiled
on a GPU, against the plain one-token attention over the whole cache (`ar.decode_attention`), on left-padded rows
whose valid slots start and stop inside, at and across the kernel's 128-slot blocks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glm_jax.models.ar import decode_attention, decode_attention_pallas
from glm_jax.models.decode_ops import BLOCK, decode_attention_blocks


def case(seed, b, kv, g, d, slots, starts, index, dtype):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(b, 1, kv * g, d)) * 2, dtype)
    k = jnp.asarray(rng.normal(size=(b, kv, slots, d)), dtype)
    v = jnp.asarray(rng.normal(size=(b, kv, slots, d)), dtype)
    pos = np.arange(slots)[None]
    mask = jnp.asarray((pos >= np.asarray(starts)[:, None]) & (pos <= index))
    return q, k, v, mask


# (G heads per KV head, cache slots, first valid slot per row, current index)
CASES = [(4, 256, [0, 5, 130], 200),          # a row whose first block is empty; the last block partly filled
         (3, 384, [0, 127, 128], 128),        # G padded to 16; the index at a block's first slot
         (16, 256, [0, 0], 0),                # one valid slot
         (2, 128, [100, 0], 127)]             # one block, filled to its end


@pytest.mark.parametrize("g,slots,starts,index", CASES)
def test_kernel_equals_attention_over_the_whole_cache_float32(g, slots, starts, index):
    q, k, v, mask = case(0, len(starts), 2, g, 32, slots, starts, index, jnp.float32)
    want = decode_attention(q, k, v, mask, 32 ** -0.5, index)
    got = decode_attention_pallas(q, k, v, mask, 32 ** -0.5, index)          # interpreted off a GPU
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=2e-6)


def test_kernel_reads_only_the_valid_slots():
    """Slots outside `[start, index]` hold garbage (NaN, huge values) that must not reach the output."""
    starts, index = [3, 140], 260
    q, k, v, mask = case(1, 2, 2, 4, 32, 384, starts, index, jnp.float32)
    junk = ~np.asarray(mask)[:, None, :, None]
    k_bad = jnp.where(junk, jnp.nan, k)
    v_bad = jnp.where(junk, 1e30, v)
    want = decode_attention(q, k, v, mask, 0.2, index)
    got = decode_attention_blocks(q.reshape(2, 2, 4, 32), k_bad, v_bad, jnp.asarray(starts), index + 1, 0.2,
                                  interpret=True)
    np.testing.assert_allclose(np.asarray(got).reshape(want.shape), np.asarray(want), rtol=1e-5, atol=2e-6)


def test_bfloat16_within_rounding_and_bad_cache_size():
    q, k, v, mask = case(2, 3, 2, 8, 64, 256, [0, 17, 129], 230, jnp.bfloat16)
    want = decode_attention(*(x.astype(jnp.float32) for x in (q, k, v)), mask, 0.125, 230)
    got = decode_attention_pallas(q, k, v, mask, 0.125, 230)
    assert got.dtype == jnp.bfloat16                       # the dtype of the queries
    got = got.astype(jnp.float32)
    err = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
    assert err < 1e-2, err
    with pytest.raises(ValueError, match=f"multiple of {BLOCK} slots, got 200"):
        decode_attention_blocks(q.reshape(3, 2, 8, 64), k[:, :, :200], v[:, :, :200], jnp.zeros(3), 1, 0.125,
                                interpret=True)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="compiles the Triton kernel")
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_compiled_kernel_on_gpu_at_the_real_shape(dtype):
    """The AR's decode at real width: 32 rows, 2 KV heads x 16 query heads of 128, a 1408-slot cache."""
    starts = np.random.default_rng(3).integers(0, 60, 32)
    q, k, v, mask = case(3, 32, 2, 16, 128, 1408, starts, 700, dtype)
    want = decode_attention(*(x.astype(jnp.float32) for x in (q, k, v)), mask, 128 ** -0.5, 700)
    got = jax.jit(decode_attention_pallas, static_argnums=4)(q, k, v, mask, 128 ** -0.5, 700)
    err = float(jnp.linalg.norm(got.astype(jnp.float32) - want) / jnp.linalg.norm(want))
    assert err < (1e-5 if dtype == jnp.float32 else 1e-2), err
