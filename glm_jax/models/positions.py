"""3-D (t, h, w) M-RoPE position ids of the GLM-Image AR model, as pure functions of the prompt layout.

transformers computes these inside `GlmImageModel.get_rope_index` and keeps the decode positions as module state;
here they are plain functions of `(input_ids, attention_mask, grids)` so that prefill and the jitted decode loop
can take them as arrays.

Prompt (prefill) positions, per sample, counting only the real (attention_mask == 1) tokens:

* a running counter `c` starts at 0; a text token gets `(c, c, c)` and advances `c` by 1;
* source image `k` is the span between the k-th image-start token and the k-th image-end token (the start token
  itself is text). Its `gh x gw` tokens (placeholders or codes, raster order) get `(c, c + r, c + col)` for row `r`,
  column `col`; afterwards `c += max(gh, gw)` (not `gh * gw`). The end token continues as text at `c`;
* only as many spans as there are image-end tokens (and source grids) count as images, so a t2i prompt (which ends
  in an image-start token with no end) is simply `0..L-1` on all three axes;
* left-padding slots (attention_mask == 0) get position 1 on every axis (what transformers puts there).

Decode positions: with `d` = the counter after the prompt, the grids that are generated (`image_grids` after the
source grids) are produced in REVERSE order of `image_grid_thw` (t2i: `[[1,th,tw],[1,ph,pw]]` -> the small preview
grid first, then the full grid; i2i: the target grid). Token (r, col) of a generated grid gets `(d, d + r, d + col)`,
then `d += max(h, w)`; one final slot (EOS) gets `(d, d, d)`. Samples of a batch with fewer decode slots are padded
by repeating their last column (as transformers does).

Example (t2i, L = 18, grids [(2, 3), (13, 19)] written as image_grid_thw [[1,13,19],[1,2,3]]): prompt `0..17`;
decode (18,18,18), (18,18,19), (18,18,20), (18,19,18), ...; the 13x19 grid starts at 18 + 3 = 21.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

Grid = tuple[int, int]


class _TokenIds(Protocol):
    image_start_token_id: int
    image_end_token_id: int


def _as_grids(grids: Sequence) -> list[Grid]:
    """Accepts `(h, w)` or `(t, h, w)` rows (as in `image_grid_thw`) and returns `(h, w)` pairs."""
    out = []
    for g in grids:
        g = [int(v) for v in g]
        if len(g) == 3:
            if g[0] != 1:
                raise ValueError(f"only single-frame grids are supported, got t={g[0]}")
            g = g[1:]
        if len(g) != 2:
            raise ValueError(f"a grid is (h, w) or (t, h, w), got {g}")
        out.append((g[0], g[1]))
    return out


def sample_prompt_positions(ids: np.ndarray, grids: Sequence, image_start_id: int, image_end_id: int
                            ) -> tuple[np.ndarray, int, int]:
    """Positions `[3, n]` of one sample's real tokens, the counter after them, and the number of source images.

    `grids` lists all grids of the sample (source grids first, then the ones to generate); only the first
    `#image-end tokens` of them are source images.
    """
    ids = np.asarray(ids)
    grids = _as_grids(grids)
    starts = np.nonzero(ids == image_start_id)[0] + 1
    ends = np.nonzero(ids == image_end_id)[0]
    n_src = min(len(starts), len(ends), len(grids))
    pieces, c, prev = [], 0, 0
    for k in range(n_src):
        start, end = int(starts[k]), int(ends[k])
        n_text = start - prev
        pieces.append(np.broadcast_to(np.arange(c, c + n_text), (3, n_text)))
        c += n_text
        gh, gw = grids[k]
        if end - start != gh * gw:
            raise ValueError(f"image {k} spans {end - start} tokens but its grid is {gh}x{gw}")
        r, col = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
        pieces.append(np.stack([np.full(gh * gw, c), c + r.ravel(), c + col.ravel()]))
        c += max(gh, gw)
        prev = end
    n_text = len(ids) - prev
    pieces.append(np.broadcast_to(np.arange(c, c + n_text), (3, n_text)))
    c += n_text
    pos = np.concatenate(pieces, axis=1) if pieces else np.zeros((3, 0), np.int64)
    return pos.astype(np.int32), c, len(ends)


def prompt_position_ids(input_ids: np.ndarray, attention_mask: np.ndarray | None,
                        image_grids: Sequence[Sequence], cfg: _TokenIds) -> tuple[np.ndarray, np.ndarray]:
    """Prefill position ids `[3, B, L]` (int32) and the decode start counter `[B]` of a (left-padded) batch.

    `image_grids[b]` lists the grids of sample b in `image_grid_thw` order: its source images' `(gh, gw)` first,
    then the grids to generate (t2i: full then preview; i2i: the target). `cfg` provides `image_start_token_id` and
    `image_end_token_id`. Padding slots get 1 on every axis.
    """
    input_ids = np.asarray(input_ids)
    b, length = input_ids.shape
    valid = np.ones_like(input_ids, bool) if attention_mask is None else np.asarray(attention_mask) == 1
    out = np.ones((3, b, length), np.int32)
    nxt = np.zeros((b,), np.int32)
    for i in range(b):
        pos, c, _ = sample_prompt_positions(input_ids[i][valid[i]], image_grids[i], cfg.image_start_token_id,
                                            cfg.image_end_token_id)
        out[:, i, valid[i]] = pos
        nxt[i] = c
    return out, nxt


def generation_grids(input_ids: np.ndarray, attention_mask: np.ndarray | None, image_grids: Sequence[Sequence],
                     cfg: _TokenIds) -> list[list[Grid]]:
    """Per sample, the grids the model generates, in generation order (reverse of `image_grid_thw` order)."""
    input_ids = np.asarray(input_ids)
    valid = np.ones_like(input_ids, bool) if attention_mask is None else np.asarray(attention_mask) == 1
    out = []
    for i in range(input_ids.shape[0]):
        grids = _as_grids(image_grids[i])
        n_src = int(np.sum(input_ids[i][valid[i]] == cfg.image_end_token_id))
        out.append(list(reversed(grids[n_src:])))
    return out


def num_generated_tokens(gen_grids: Sequence[Grid]) -> int:
    """Tokens generated for one sample: all grid tokens plus the final EOS slot."""
    return sum(h * w for h, w in _as_grids(gen_grids)) + 1


def decode_offsets(gen_grids: Sequence[Sequence[Grid]]) -> np.ndarray:
    """Position offsets `[3, B, N]` of the decode slots relative to each sample's start counter (static table).

    `gen_grids[b]` lists sample b's grids in generation order; shorter samples are padded by repeating their last
    column. `N = max_b (sum h*w + 1)`.
    """
    cols = []
    for grids in gen_grids:
        t_, h_, w_ = [], [], []
        d = 0
        for h, w in _as_grids(grids):
            r, col = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
            t_.append(np.full(h * w, d))
            h_.append(d + r.ravel())
            w_.append(d + col.ravel())
            d += max(h, w)
        for a in (t_, h_, w_):
            a.append(np.array([d]))
        cols.append(np.stack([np.concatenate(t_), np.concatenate(h_), np.concatenate(w_)]))
    n = max(c.shape[1] for c in cols)
    padded = [np.concatenate([c, np.repeat(c[:, -1:], n - c.shape[1], axis=1)], axis=1) for c in cols]
    return np.stack(padded, axis=1).astype(np.int32)


def decode_position_ids(start, gen_grids: Sequence[Sequence[Grid]]):
    """Decode position ids `[3, B, N]`: `start[b]` (numpy or jax array, from `prompt_position_ids`) plus the
    static offsets of `decode_offsets(gen_grids)`. Slot n is the position of the n-th generated token."""
    return start[None, :, None] + decode_offsets(gen_grids)
