"""Autoregressive rollout of the GLM-Image AR model: the processed sampling policy, a jitted sampler with per-token
log-probs, and teacher-forced re-scoring with the same numerics (`design/grpo_math.md` §2,
`design/glm_image_architecture.md` §1.3, §2.3).

Generated layout (one row of `tokens [B, N]`, static per batch):

    t2i:  [ preview grid ph*pw (raster) | target grid th*tw (raster) | final ]    N = ph*pw + th*tw + 1
    i2i:  [ target grid th*tw (raster) | final ]                                  N = th*tw + 1

with `th, tw = H/32, W/32` and the preview size of the HF processor (`ArLayout.t2i`). The pipeline keeps only the
target grid; the preview tokens are actions of the trajectory all the same (`ArLayout.loss_mask`).

Processed policy (HF `_sample` order, all float32): logits -> mask invalid ids -> `/ temperature` -> top-k (keeps
every token >= the k-th largest value) -> top-p (sort ascending, cumsum of the softmax, drop the prefix whose
cumsum <= 1 - top_p, always keep the largest) -> log-softmax over the kept set; `-inf` outside it.

Deliberate deviation from the reference (RL): transformers restricts nothing but the `lm_head` rows, so it can sample
an id >= n_codes inside a grid (past the DiT prior table) or an early EOS (the pipeline's `view(th, tw)` then
crashes). Here only image codes `0..n_codes-1` are valid inside a grid and only `eos_id` is valid at the final slot,
so the final token is always EOS with log-prob exactly 0 (no decode step is run for it).

Ties: the nucleus is decided on a STABLE ascending sort (equal values ordered by index), so when a group of equal
logits straddles the top-p boundary the highest-index members are kept. torch's default `sort` is not stable on
CPU; it keeps the same number of tied tokens (same probabilities), possibly other members of the group.

RNG: sample `b` uses the stream `fold_in(key, sample_id[b])` (default `sample_id = b`, or the given per-sample keys)
and token `n` is drawn with `fold_in(stream, n)` by `jax.random.categorical` on the processed log-probs.

Positions: token `n` is fed back at 3-D M-RoPE position `decode_positions[:, :, n]` and cache slot `L + n`
(`glm_jax.models.positions.decode_position_ids`); `score_tokens` feeds the same positions in one forward.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from glm_jax.models.layers import cast_for_compute

Grid = tuple[int, int]
ProgressFn = Callable[[int, int], None]


# ----------------------------------------------------------------------------------------------------------------
# Parameters and layout


@dataclass(frozen=True)
class SamplingParams:
    """Sampling warpers, defaults from the AR `generation_config.json` (temperature 0.9, top_k 16512, top_p 0.75).

    `top_k=None` or `top_k >= vocab` disables top-k; `top_p >= 1` disables top-p; `temperature == 1` is a no-op.
    """

    temperature: float = 0.9
    top_k: int | None = 16512
    top_p: float = 0.75
    min_tokens_to_keep: int = 1

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k is not None and self.top_k <= 0:
            raise ValueError(f"top_k must be a positive int or None, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.min_tokens_to_keep < 1:
            raise ValueError(f"min_tokens_to_keep must be >= 1, got {self.min_tokens_to_keep}")


@dataclass(frozen=True)
class ArLayout:
    """Grids generated for one image: `target (th, tw)` and, for t2i, the `preview (ph, pw)` generated first."""

    target: Grid
    preview: Grid | None = None

    @staticmethod
    def _grid(height: int, width: int) -> Grid:
        if height % 32 or width % 32 or height <= 0 or width <= 0:
            raise ValueError(f"height and width must be positive multiples of 32, got {height}x{width}")
        return height // 32, width // 32

    @classmethod
    def t2i(cls, height: int, width: int) -> ArLayout:
        """Text-to-image: target `(H/32, W/32)` and the HF processor's preview grid
        `(int(sqrt(r) * 16), int(sqrt(1 / r) * 16))`, `r = th / tw`."""
        th, tw = cls._grid(height, width)
        r = th / tw
        return cls(target=(th, tw), preview=(int(math.sqrt(r) * 16), int(math.sqrt(1 / r) * 16)))

    @classmethod
    def i2i(cls, height: int, width: int) -> ArLayout:
        """Image-to-image: the target grid only."""
        return cls(target=cls._grid(height, width))

    @property
    def n_preview(self) -> int:
        return 0 if self.preview is None else self.preview[0] * self.preview[1]

    @property
    def n_target(self) -> int:
        return self.target[0] * self.target[1]

    @property
    def n_tokens(self) -> int:
        """Generated tokens N: the grids plus the final EOS slot."""
        return self.n_preview + self.n_target + 1

    @property
    def gen_grids(self) -> list[Grid]:
        """Grids in generation order (input of `positions.decode_offsets`)."""
        return ([] if self.preview is None else [self.preview]) + [self.target]

    @property
    def image_grid_thw(self) -> list[list[int]]:
        """The generated grids' `image_grid_thw` rows in processor order (t2i: target first, then preview)."""
        return [[1, *g] for g in reversed(self.gen_grids)]

    def loss_mask(self) -> np.ndarray:
        """`[N]` float32: 1 on the grid tokens (preview and target), 0 on the final EOS slot."""
        m = np.ones(self.n_tokens, np.float32)
        m[-1] = 0.0
        return m

    def split(self, tokens_BN: jax.Array) -> tuple[jax.Array | None, jax.Array]:
        """(preview `[B, ph, pw]` or None, target `[B, th, tw]`) from generated tokens `[B, N]`."""
        b, p = tokens_BN.shape[0], self.n_preview
        preview = None if self.preview is None else tokens_BN[:, :p].reshape(b, *self.preview)
        return preview, tokens_BN[:, p:p + self.n_target].reshape(b, *self.target)


# ----------------------------------------------------------------------------------------------------------------
# Processed policy


def slot_valid_mask(vocab: int, n_codes: int, eos_id: int, is_final: jax.Array | bool = False) -> jax.Array:
    """Valid ids `[..., V]` of a slot: codes `0..n_codes-1` inside a grid, only `eos_id` at the final slot."""
    ids = jnp.arange(vocab)
    return jnp.where(jnp.asarray(is_final)[..., None], ids == eos_id, ids < n_codes)


def scaled_logits(logits: jax.Array, valid: jax.Array, params: SamplingParams) -> jax.Array:
    """`where(valid, float32(logits) / T, -inf)` (the masked-temperature logits z~)."""
    z = logits.astype(jnp.float32)
    if params.temperature != 1.0:
        z = z / jnp.float32(params.temperature)
    return jnp.where(valid, z, -jnp.inf)


class KeptBounds(NamedTuple):
    """Where the kept set of each row ends, `[..., 1]` per row, on the masked logits before the temperature (the
    sort keys, as float32): every finite token >= `kth` (the k-th largest key, `-inf` without top-k) and above `thr`
    (the nucleus boundary key, `-inf` without top-p) or equal to it with an index >= `first_tie` (int32; the stable
    sort's order of equal keys)."""

    kth: jax.Array
    thr: jax.Array
    first_tie: jax.Array


# `checkpoint_name`s of what the re-scoring's remat keeps of each chunk (`SCORE_SAVED`): the kept set's bounds (three
# numbers per position: the backward pass rebuilds the kept set by comparisons and does not sort the vocabulary
# again) and the chunk's logits in the compute dtype (the backward pass does not run the `lm_head` matmul a third
# time; one micro-batch's logits, e.g. 8 x 1280 x 16512 x 2 bytes = 338 MB in bf16, live until its backward pass).
KEPT_BOUNDS = "ar_kept_bounds"
CHUNK_LOGITS = "ar_chunk_logits"
SCORE_SAVED = (KEPT_BOUNDS, CHUNK_LOGITS)


def sort_keys(logits: jax.Array, valid: jax.Array) -> jax.Array:
    """`where(valid, logits, -inf)` in the logits' own dtype: what the kept set is found and rebuilt on.

    The keys are the logits themselves, not the masked-temperature logits z~ = logits / T: the temperature is a
    positive scale, so they order the tokens as z~ does, and a comparison of keys is exact wherever it is evaluated.
    A comparison on z~ is not: z~ is a division, which XLA may emit in several fusions of one program and, on a GPU,
    by different code (a Triton fusion's float32 division is not correctly rounded), so a recomputed z~ can differ
    from the sorted one in the last bit, and the boundary token then falls out of the kept set (seen on an H200:
    the re-scoring's backward pass, rebuilding the kept set from saved bounds, moved an AR gradient by 5%). 16-bit
    keys also sort in under half the time of float32 ones (`benchmarks/RESULTS.md`)."""
    return jnp.where(valid, logits, jnp.asarray(-jnp.inf, logits.dtype))


def kept_bounds(keys: jax.Array, params: SamplingParams) -> KeptBounds:
    """The bounds (no gradient) of the kept set of top-k then top-p, from the `sort_keys` of a row.

    One ascending sort of the keys per row gives the k-th largest key and the nucleus boundary (the first kept
    sorted entry; the nucleus is summed over the sorted keys mapped to z~ as `scaled_logits` maps them, cast then
    `/ temperature`); of the tokens whose key equals the boundary key, those from the boundary token's index on are
    kept (stable-sort tie order)."""
    keys = jax.lax.stop_gradient(keys)
    vocab = keys.shape[-1]
    top_k = vocab if params.top_k is None else max(params.top_k, params.min_tokens_to_keep)
    use_k = top_k < vocab
    use_p = params.top_p < 1.0
    row = keys.shape[:-1] + (1,)
    kth = thr = jnp.full(row, -jnp.inf, jnp.float32)
    first_tie = jnp.zeros(row, jnp.int32)
    if not (use_k or use_p):
        return KeptBounds(kth, thr, first_tie)
    s_key = jnp.sort(keys, axis=-1).astype(jnp.float32)   # values only: equal keys' order is recovered by index
    if use_k:
        kth = s_key[..., vocab - top_k][..., None]
        s_key = jnp.where(s_key >= kth, s_key, -jnp.inf)
    if use_p:
        s = s_key / jnp.float32(params.temperature) if params.temperature != 1.0 else s_key
        iota = jax.lax.broadcasted_iota(jnp.int32, keys.shape, keys.ndim - 1)
        cum = jnp.cumsum(jax.nn.softmax(s, axis=-1), axis=-1)
        remove = (cum <= jnp.float32(1.0 - params.top_p)) & (iota < vocab - params.min_tokens_to_keep)
        first = jnp.max(jnp.where(remove, iota + 1, 0), axis=-1, keepdims=True)  # first kept sorted slot
        thr = jnp.take_along_axis(s_key, first, axis=-1)
        k32 = keys.astype(jnp.float32)   # exact for 16- and 32-bit keys
        # In a stable ascending sort the tokens equal to `thr` sit in index order from slot #(keys < thr); the
        # boundary slot `first` is the one of rank `first - #(keys < thr)` among them: that one and later ones stay.
        tie = k32 == thr
        rank = jnp.cumsum(tie, axis=-1) - 1
        below = jnp.sum(k32 < thr, axis=-1, keepdims=True)
        first_tie = jnp.min(jnp.where(tie & (rank >= first - below), iota, vocab), axis=-1, keepdims=True)
    return KeptBounds(kth, thr, first_tie)


def kept_from_bounds(keys: jax.Array, bounds: KeptBounds) -> jax.Array:
    """The kept set (bool `[..., V]`) that `bounds` describe, by comparisons of the `sort_keys` alone."""
    k = jax.lax.stop_gradient(keys).astype(jnp.float32)
    iota = jax.lax.broadcasted_iota(jnp.int32, k.shape, k.ndim - 1)
    return (jnp.isfinite(k) & (k >= bounds.kth)
            & ((k > bounds.thr) | ((k == bounds.thr) & (iota >= bounds.first_tie))))


def kept_mask(keys: jax.Array, params: SamplingParams) -> jax.Array:
    """The kept set (bool `[..., V]`, no gradient) of top-k then top-p on the `sort_keys` of a row
    (`kept_bounds`, `kept_from_bounds`)."""
    return kept_from_bounds(keys, kept_bounds(keys, params))


def processed_and_temperature_logprobs(logits: jax.Array, valid: jax.Array, params: SamplingParams
                                       ) -> tuple[jax.Array, jax.Array]:
    """(log pi, log q) `[..., V]`: the processed policy and the smooth masked-temperature distribution, from the
    same z~ (the kept set is a stop-gradient boolean, so both are differentiable in the logits)."""
    z = scaled_logits(logits, valid, params)
    keys = sort_keys(logits, valid)
    bounds = checkpoint_name(kept_bounds(keys, params), KEPT_BOUNDS)
    lp = jax.nn.log_softmax(jnp.where(kept_from_bounds(keys, bounds), z, -jnp.inf), axis=-1)
    return lp, jax.nn.log_softmax(z, axis=-1)


def processed_logprobs(logits: jax.Array, valid: jax.Array, params: SamplingParams) -> jax.Array:
    """log pi `[..., V]` of the processed sampling policy (HF temperature -> top-k -> top-p, after masking invalid
    ids); `-inf` outside the kept set."""
    return processed_and_temperature_logprobs(logits, valid, params)[0]


def masked_temperature_logprobs(logits: jax.Array, valid: jax.Array, params: SamplingParams) -> jax.Array:
    """log q = log_softmax(z~) `[..., V]`: finite on every valid id (for the KL term, grpo_math §2.2)."""
    return jax.nn.log_softmax(scaled_logits(logits, valid, params), axis=-1)


def draw_token(key: jax.Array, logprobs_V: jax.Array) -> jax.Array:
    """One token id (int32) drawn from `exp(logprobs)` (ids with `-inf` are never drawn)."""
    return jax.random.categorical(key, logprobs_V).astype(jnp.int32)


def sample_keys(key: jax.Array, batch: int, sample_ids: jax.Array | None = None) -> jax.Array:
    """Per-sample stream keys `[B]`: `fold_in(key, sample_ids[b])` for one root key (default ids `0..B-1`), or the
    given keys when `key` already holds one per sample."""
    key = jnp.asarray(key)
    typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
    if key.ndim == (0 if typed else 1):
        ids = jnp.arange(batch, dtype=jnp.uint32) if sample_ids is None else jnp.asarray(sample_ids, jnp.uint32)
        return jax.vmap(lambda i: jax.random.fold_in(key, i))(ids)
    if key.shape[0] != batch:
        raise ValueError(f"got {key.shape[0]} keys for a batch of {batch}")
    return key


def _gather(x_BNV: jax.Array, ids_BN: jax.Array) -> jax.Array:
    return jnp.take_along_axis(x_BNV, ids_BN[..., None].astype(jnp.int32), axis=-1)[..., 0]


# ----------------------------------------------------------------------------------------------------------------
# Sampler


class ArRollout(NamedTuple):
    """Sampled tokens `[B, N]` (int32), their processed log-probs `[B, N]` (0 at the final EOS slot), and the
    preview `[B, ph, pw]` (t2i, else None) and target `[B, th, tw]` grids."""

    tokens: jax.Array
    logprobs: jax.Array
    preview: jax.Array | None
    target: jax.Array


def _check_ids(vocab: int, n_codes: int, eos_id: int) -> None:
    if not 0 < n_codes <= vocab:
        raise ValueError(f"n_codes={n_codes} must be in 1..{vocab} (the lm_head rows)")
    if not 0 <= eos_id < vocab:
        raise ValueError(f"eos_id={eos_id} is not an lm_head row (vocab {vocab})")


def sample_tokens(model, input_ids_BL: jax.Array, attention_mask_BL: jax.Array, position_ids_3BL: jax.Array,
                  decode_positions_3BN: jax.Array, keys_B: jax.Array, cache, params: SamplingParams, *,
                  n_codes: int, eos_id: int, progress: ProgressFn | None = None, progress_every: int = 0
                  ) -> tuple[jax.Array, jax.Array]:
    """(tokens `[B, N]`, processed log-probs `[B, N]`): prefill, then N-2 decode steps in a `lax.scan`; the final
    slot is EOS (log-prob 0). Pure; meant to run inside `jax.jit` (see `sample_ar`). `cache` needs >= L+N-2
    slots; `progress(n, N)` is called through `jax.debug.callback` every `progress_every` tokens when given."""
    b, length = input_ids_BL.shape
    n_tok = decode_positions_3BN.shape[-1]
    vocab = model.cfg.text.vision_vocab_size
    code_valid = slot_valid_mask(vocab, n_codes, eos_id)

    def draw(logits_BV, n):
        lp_BV = processed_logprobs(logits_BV, code_valid, params)
        step_keys = jax.vmap(jax.random.fold_in, (0, None))(keys_B, n)
        tok_B = jax.vmap(draw_token)(step_keys, lp_BV)
        return tok_B, _gather(lp_BV, tok_B)

    # logits in the head's dtype: the processing casts them to fp32 itself and sorts 16-bit ones faster
    logits, cache = model.prefill(input_ids_BL, position_ids_3BL, attention_mask_BL, cache, fp32=False)
    tok0, lp0 = draw(logits, 0)

    def body(carry, xs):
        cache, tok = carry
        n, pos_3B = xs  # produce token n: feed token n-1 at slot L+n-1 and its position
        logits, cache = model.decode(tok, pos_3B, cache, length + n - 1, fp32=False)
        tok_n, lp_n = draw(logits, n)
        if progress is not None and progress_every > 0:
            jax.lax.cond(n % progress_every == 0, lambda: jax.debug.callback(progress, n, n_tok),
                         lambda: None)
        return (cache, tok_n), (tok_n, lp_n)

    steps = jnp.arange(1, n_tok - 1, dtype=jnp.int32)
    pos_xs = jnp.moveaxis(decode_positions_3BN[:, :, :n_tok - 2], 2, 0)
    _, (toks, lps) = jax.lax.scan(body, (cache, tok0), (steps, pos_xs))
    if progress is not None and progress_every > 0:
        # the last tokens as an operand: without a data dependency XLA may run this callback before the loop
        jax.debug.callback(lambda _last, n, total: progress(n, total), toks[-1], n_tok, n_tok)
    tokens = jnp.concatenate([tok0[:, None], toks.T, jnp.full((b, 1), eos_id, jnp.int32)], axis=1)
    logprobs = jnp.concatenate([lp0[:, None], lps.T, jnp.zeros((b, 1), jnp.float32)], axis=1)
    return tokens, logprobs


@partial(jax.jit, static_argnames=("graphdef", "params", "n_codes", "eos_id", "cache_dtype", "progress",
                                   "progress_every"))
def _sample_jit(graphdef, state, input_ids, attention_mask, position_ids, decode_positions, keys, *, params,
                n_codes, eos_id, cache_dtype, progress, progress_every):
    model = cast_for_compute(nnx.merge(graphdef, state))   # float32 weights: one bfloat16 copy, not a cast per token
    b, length = input_ids.shape
    cache = model.init_cache(b, length + decode_positions.shape[-1] - 2, cache_dtype)
    return sample_tokens(model, input_ids, attention_mask, position_ids, decode_positions, keys, cache, params,
                         n_codes=n_codes, eos_id=eos_id, progress=progress, progress_every=progress_every)


def sample_ar(model_graphdef, model_state, input_ids: jax.Array, attention_mask: jax.Array,
              position_ids: jax.Array, decode_positions: jax.Array, key: jax.Array,
              params: SamplingParams = SamplingParams(), *, n_codes: int, eos_id: int, layout: ArLayout,
              sample_ids: jax.Array | None = None, cache_dtype=None, progress: ProgressFn | None = None,
              progress_every: int = 0) -> ArRollout:
    """Samples one image's tokens per prompt row: prefill + fixed-shape decode loop in one jit.

    `input_ids`/`attention_mask` `[B, L]` are left-padded; `position_ids [3, B, L]` and `decode_positions
    [3, B, N]` come from `glm_jax.models.positions` (N = `layout.n_tokens`). `key` is one root key (streams
    `fold_in(key, sample_ids[b])`) or `[B]` per-sample keys. The KV cache (`L + N - 2` slots, `cache_dtype`,
    default the model dtype) is allocated inside the jit: it never crosses the jit boundary, the scan updates it
    in place and XLA frees it on return (what donating an outside buffer would buy, without the copy-in).
    Compiles once per (B, L, N), params, ids, cache dtype and progress callable (pass the same callable to
    reuse the compile).
    """
    graphdef = model_graphdef
    vocab = nnx.merge(graphdef, model_state).cfg.text.vision_vocab_size
    _check_ids(vocab, n_codes, eos_id)
    b, length = input_ids.shape
    n_tok = layout.n_tokens
    if tuple(decode_positions.shape) != (3, b, n_tok):
        raise ValueError(f"decode_positions must be [3, {b}, {n_tok}] for {layout}, got {decode_positions.shape}")
    if tuple(position_ids.shape) != (3, b, length):
        raise ValueError(f"position_ids must be [3, {b}, {length}], got {position_ids.shape}")
    if n_tok < 2:
        raise ValueError("the layout needs at least one grid token")
    keys = sample_keys(key, b, sample_ids)
    tokens, logprobs = _sample_jit(graphdef, model_state, jnp.asarray(input_ids), jnp.asarray(attention_mask),
                                   jnp.asarray(position_ids), jnp.asarray(decode_positions), keys, params=params,
                                   n_codes=int(n_codes), eos_id=int(eos_id), cache_dtype=cache_dtype,
                                   progress=progress, progress_every=int(progress_every))
    preview, target = layout.split(tokens)
    return ArRollout(tokens, logprobs, preview, target)


# ----------------------------------------------------------------------------------------------------------------
# Teacher-forced re-scoring


class TokenScores(NamedTuple):
    """Per-token `[B, N]`: processed log pi (`-inf` where the token fell outside the kept set), masked-temperature
    log q, and whether the token is in the kept set. The final EOS slot has 0, 0, True."""

    logprobs: jax.Array
    temperature_logprobs: jax.Array
    in_nucleus: jax.Array


def _chunked_token_scores(model, hidden_BMD: jax.Array, tokens_BM: jax.Array, valid_V: jax.Array,
                          params: SamplingParams, chunk: int) -> tuple[jax.Array, jax.Array]:
    """(log pi, log q) `[B, M]` of `tokens` from final hidden states, `chunk` positions at a time: logits, sort and
    log-softmax live per chunk only and are recomputed in the backward pass (`jax.checkpoint`) from the chunk's
    logits and the kept set's bounds, which it saves (`SCORE_SAVED`): the backward pass neither sorts nor runs the
    `lm_head` again."""
    b, m, d = hidden_BMD.shape
    chunk = max(1, min(chunk, m))
    n_chunks = -(-m // chunk)
    pad = n_chunks * chunk - m
    h = jnp.pad(hidden_BMD, ((0, 0), (0, pad), (0, 0)))
    t = jnp.pad(tokens_BM, ((0, 0), (0, pad)))
    h = jnp.moveaxis(h.reshape(b, n_chunks, chunk, d), 1, 0)
    t = jnp.moveaxis(t.reshape(b, n_chunks, chunk), 1, 0)

    @partial(jax.checkpoint, policy=jax.checkpoint_policies.save_only_these_names(*SCORE_SAVED))
    def one(args):
        h_BcD, t_Bc = args
        logits = checkpoint_name(model.logits(h_BcD, fp32=False), CHUNK_LOGITS)
        lp, lq = processed_and_temperature_logprobs(logits, valid_V, params)
        return _gather(lp, t_Bc), _gather(lq, t_Bc)

    def unchunk(x):
        return jnp.moveaxis(x, 0, 1).reshape(b, n_chunks * chunk)[:, :m]

    lp, lq = jax.lax.map(one, (h, t))
    return unchunk(lp), unchunk(lq)


def fed_back_tokens(n_tokens: int) -> int:
    """Generated tokens that `score_tokens` feeds back into its teacher-forced forward (all but the last two: the
    EOS slot scores 0 and the token before it is only predicted). That forward runs on prompt + this many."""
    return n_tokens - 2


def score_tokens(model, input_ids_BL: jax.Array, attention_mask_BL: jax.Array, position_ids_3BL: jax.Array,
                 decode_positions_3BN: jax.Array, tokens_BN: jax.Array, params: SamplingParams = SamplingParams(),
                 *, n_codes: int, eos_id: int, chunk: int = 128) -> TokenScores:
    """Teacher-forced per-token log-probs of generated `tokens [B, N]` under the processed policy and the
    masked-temperature distribution: one `forward` over prompt + tokens[:N-2] at the decode positions, then the
    sampler's fp32 processing, `chunk` positions at a time. Pure and differentiable w.r.t. the model params
    (call inside `jax.jit` / `jax.grad`); the final EOS slot scores 0."""
    vocab = model.cfg.text.vision_vocab_size
    _check_ids(vocab, n_codes, eos_id)
    b, length = input_ids_BL.shape
    n_tok = tokens_BN.shape[1]
    n_in = fed_back_tokens(n_tok)
    tokens_BN = tokens_BN.astype(jnp.int32)
    ids = jnp.concatenate([input_ids_BL.astype(jnp.int32), tokens_BN[:, :n_in]], axis=1)
    pos = jnp.concatenate([position_ids_3BL, decode_positions_3BN[:, :, :n_in]], axis=2).astype(jnp.int32)
    mask = jnp.concatenate([attention_mask_BL.astype(bool), jnp.ones((b, n_in), bool)], axis=1)
    hidden = model.hidden_states(ids, pos, mask)[:, length - 1:]  # predicts tokens 0..N-2
    lp, lq = _chunked_token_scores(model, hidden, tokens_BN[:, :n_tok - 1],
                                   slot_valid_mask(vocab, n_codes, eos_id), params, chunk)
    zeros = jnp.zeros((b, 1), jnp.float32)
    lp = jnp.concatenate([lp, zeros], axis=1)
    lq = jnp.concatenate([lq, zeros], axis=1)
    return TokenScores(lp, lq, jnp.isfinite(jax.lax.stop_gradient(lp)))


@partial(jax.jit, static_argnames=("graphdef", "params", "n_codes", "eos_id", "chunk"))
def _score_jit(graphdef, state, input_ids, attention_mask, position_ids, decode_positions, tokens, *, params,
               n_codes, eos_id, chunk):
    return score_tokens(nnx.merge(graphdef, state), input_ids, attention_mask, position_ids, decode_positions,
                        tokens, params, n_codes=n_codes, eos_id=eos_id, chunk=chunk)


def score_tokens_jit(model_graphdef, model_state, input_ids: jax.Array, attention_mask: jax.Array,
                     position_ids: jax.Array, decode_positions: jax.Array, tokens: jax.Array,
                     params: SamplingParams = SamplingParams(), *, n_codes: int, eos_id: int, chunk: int = 128
                     ) -> TokenScores:
    """`score_tokens` jitted over the model state (no gradient; for re-scoring rollouts)."""
    return _score_jit(model_graphdef, model_state, jnp.asarray(input_ids), jnp.asarray(attention_mask),
                      jnp.asarray(position_ids), jnp.asarray(decode_positions), jnp.asarray(tokens),
                      params=params, n_codes=int(n_codes), eos_id=int(eos_id), chunk=int(chunk))
