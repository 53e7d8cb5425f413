"""Glyph conditioning of GLM-Image: quoted texts of a prompt -> ByT5 ids -> T5 encoder -> `[B, T, D]` embeds.

Reproduces `GlmImagePipeline.get_glyph_texts` / `_get_glyph_embeds` / `encode_prompt` (diffusers 0.42.1), quirks
included, because the DiT was trained on exactly these inputs:

1. Glyph strings are `re.findall` matches of four patterns, concatenated pattern by pattern (not in order of
   appearance): '...', “...”, "...", 「...」. Apostrophes count as quotes, so "it's don't" yields "s don".
2. A prompt without glyph strings is encoded as the single string "" (ids `[EOS]`), never as nothing.
3. ByT5 ids: UTF-8 byte + 3, then EOS = 1; special-token strings written in the text (`<pad>`, `</s>`, `<unk>`,
   `<extra_id_N>`) are recognised as by `ByT5Tokenizer`; truncation keeps `max_length - 1` ids plus EOS.
4. If a prompt has an EVEN number of glyph strings, every one of its id lists gets a leading pad id 0, and that pad
   is a real (unmasked) token whose output is kept.
5. Each string is encoded on its own (strings of one prompt are right-padded to a common length with a mask), and
   the valid outputs of all its strings are concatenated: prompt b gets `T_b` vectors.
6. Across the batch, prompts are LEFT-padded with zero vectors to `T = max_b T_b`. No mask reaches the DiT, so the
   padding zeros are attended there: batched results differ from per-prompt results, and `T` must not be rounded.
7. The classifier-free-guidance negative is the embedding of "" for every prompt: `[B, 1, D]`.

Because T5 attention masks padded keys exactly (their softmax weight is 0) and relative positions of real tokens do
not depend on right padding, all strings of all prompts are encoded in one jitted call on a `[N, S]` batch padded
to bucketed sizes; the valid rows are then gathered into the pipeline's layout.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
BYTE_OFFSET = 3           # ids 0..2 are pad / eos / unk; byte b has id b + 3
EXTRA_ID_BASE = 259       # `<extra_id_i>` -> 259 + i in transformers' ByT5Tokenizer (125 of them)
NUM_EXTRA_IDS = 125

# The pipeline's patterns, in its order; matches are concatenated pattern by pattern.
GLYPH_PATTERNS: tuple[re.Pattern, ...] = (
    re.compile(r"'([^']*)'"),
    re.compile("\u201c([^\u201c\u201d]*)\u201d"),
    re.compile(r'"([^"]*)"'),
    re.compile("\u300c([^\u300c\u300d]*)\u300d"),
)

# Special-token strings that ByT5Tokenizer recognises inside text. The first three are AddedTokens with
# lstrip=rstrip=True: whitespace next to them is removed. `<extra_id_i>` strip nothing.
_SPECIAL_IDS: dict[str, int] = {"<pad>": PAD_ID, "</s>": EOS_ID, "<unk>": UNK_ID,
                                **{f"<extra_id_{i}>": EXTRA_ID_BASE + i for i in range(NUM_EXTRA_IDS)}}
_STRIPPING = frozenset(("<pad>", "</s>", "<unk>"))
# Longest alternative first, so that "<extra_id_12>" wins over "<extra_id_1>" as the tokenizer's trie does.
_SPECIAL_RE = re.compile("(" + "|".join(re.escape(t) for t in sorted(_SPECIAL_IDS, key=len, reverse=True)) + ")")


def quoted_texts(prompt: str) -> list[str]:
    """The quoted strings of `prompt` as `get_glyph_texts` finds them (may be empty)."""
    return [m for pattern in GLYPH_PATTERNS for m in pattern.findall(prompt)]


def glyph_texts(prompt: str) -> list[str]:
    """The strings the pipeline encodes for `prompt`: its quoted texts, or `[""]` when it has none."""
    return quoted_texts(prompt) or [""]


def byt5_ids(text: str, max_length: int = 2048) -> list[int]:
    """`ByT5Tokenizer()(text, max_length=max_length, truncation=True).input_ids`, without tokenizer files."""
    pieces = _SPECIAL_RE.split(text)  # [text, special, text, special, ..., text]
    for i in range(1, len(pieces), 2):
        if pieces[i] in _STRIPPING:
            pieces[i - 1] = pieces[i - 1].rstrip()
            pieces[i + 1] = pieces[i + 1].lstrip()
    ids: list[int] = []
    for i, piece in enumerate(pieces):
        if i % 2:
            ids.append(_SPECIAL_IDS[piece])
        else:
            ids.extend(b + BYTE_OFFSET for b in piece.encode("utf-8"))
    # Truncation reserves one slot for EOS; EOS is not added again when the (truncated) ids already end with it.
    ids = ids[:max_length - 1]
    if not ids or ids[-1] != EOS_ID:
        ids.append(EOS_ID)
    return ids


def glyph_token_ids(texts: Sequence[str], max_length: int = 2048) -> list[list[int]]:
    """ByT5 ids of the glyph strings of ONE prompt, with the pipeline's even-count quirk.

    `_get_glyph_embeds` prepends `[pad] * ((len(input_ids) + 1) % 2)` to every id list, where `len(input_ids)` is
    the number of strings: with an even number of strings each list starts with one unmasked pad id 0.
    """
    ids = [byt5_ids(t, max_length) for t in texts]
    lead = [PAD_ID] * ((len(ids) + 1) % 2)
    return [lead + x for x in ids]


@dataclass(frozen=True)
class GlyphBatch:
    """Host arrays for encoding the glyph strings of B prompts in one `[N, S]` T5 call.

    `ids`/`mask` hold every string of every prompt (rows beyond the real strings are all padding); `gather[b, t]`
    indexes the flattened `[N * S]` encoder output and `valid[b, t]` is False on the left zero padding.
    """

    ids: np.ndarray        # [N, S] int32, right-padded with PAD_ID
    mask: np.ndarray       # [N, S] bool
    gather: np.ndarray     # [B, T] int32
    valid: np.ndarray      # [B, T] bool
    lengths: np.ndarray    # [B] int32, T_b = valid tokens of prompt b


def _bucket_rows(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _bucket_len(s: int) -> int:
    step = 16 if s <= 256 else 128
    return -(-s // step) * step


def glyph_batch(prompts: str | Sequence[str], max_length: int = 2048, bucket: bool = True) -> GlyphBatch:
    """Tokenises the glyph strings of `prompts` and lays out the pipeline's left-padded `[B, T]` gather.

    With `bucket`, the string count is rounded up to a power of two and the length to a multiple of 16 (128 above
    256), so that the jitted encoder sees few distinct shapes; `T` itself is never rounded.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    per_prompt = [glyph_token_ids(glyph_texts(p), max_length) for p in prompts]
    rows = [ids for lists in per_prompt for ids in lists]
    n, s = len(rows), max(len(r) for r in rows)
    if bucket:
        n, s = _bucket_rows(n), _bucket_len(s)
    ids = np.full((n, s), PAD_ID, np.int32)
    mask = np.zeros((n, s), bool)
    for r, x in enumerate(rows):
        ids[r, :len(x)] = x
        mask[r, :len(x)] = True
    lengths = np.array([sum(len(x) for x in lists) for lists in per_prompt], np.int32)
    t = int(lengths.max())
    gather = np.zeros((len(prompts), t), np.int32)
    valid = np.zeros((len(prompts), t), bool)
    row = 0
    for b, lists in enumerate(per_prompt):
        flat = [(row + j) * s + k for j, x in enumerate(lists) for k in range(len(x))]
        row += len(lists)
        gather[b, t - len(flat):] = flat  # left padding, as `_get_glyph_embeds` does
        valid[b, t - len(flat):] = True
    return GlyphBatch(ids=ids, mask=mask, gather=gather, valid=valid, lengths=lengths)


@partial(jax.jit, static_argnums=0)
def _encode(graphdef: nnx.GraphDef, state: nnx.State, ids: jax.Array, mask: jax.Array) -> jax.Array:
    return nnx.merge(graphdef, state)(ids, mask)


def encode_batch(t5_module: nnx.Module, batch: GlyphBatch, dtype=None) -> jax.Array:
    """Runs the encoder on `batch` (jitted per padded shape) and returns the `[B, T, D]` glyph embeddings."""
    graphdef, state = nnx.split(t5_module)
    hidden_NSD = _encode(graphdef, state, jnp.asarray(batch.ids), jnp.asarray(batch.mask))
    flat = hidden_NSD.reshape(-1, hidden_NSD.shape[-1])
    out_BTD = jnp.where(jnp.asarray(batch.valid)[..., None], flat[jnp.asarray(batch.gather)], 0)
    return out_BTD if dtype is None else out_BTD.astype(dtype)


def glyph_embeds(t5_module: nnx.Module, prompts: str | Sequence[str], *, max_length: int = 2048,
                 bucket: bool = True, dtype=None) -> tuple[jax.Array, np.ndarray]:
    """`_get_glyph_embeds(prompts)`: `([B, T, D] embeddings, [B] valid lengths T_b)`.

    Row b holds `T - T_b` zero vectors followed by the encoder outputs of prompt b's glyph tokens.
    """
    batch = glyph_batch(prompts, max_length, bucket)
    return encode_batch(t5_module, batch, dtype), batch.lengths


def negative_glyph_embeds(t5_module: nnx.Module, batch_size: int, *, dtype=None) -> jax.Array:
    """The CFG negative of `encode_prompt`: the glyph embedding of "" (ids `[EOS]`) for each row, `[B, 1, D]`."""
    one, _ = glyph_embeds(t5_module, [""], dtype=dtype)
    return jnp.broadcast_to(one, (batch_size, *one.shape[1:]))
