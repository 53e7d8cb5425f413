"""3-D M-RoPE position ids equal transformers' (`get_rope_index` + the decode positions used during `generate`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from glm_jax.models import positions as P
from tests.tiny_torch import tiny_ar

# tiny token ids (tests/tiny_torch.py): codes 0..127, bytes 130..385
BOS, EOS, IMAGE, SOP, EOP = 128, 129, 386, 387, 388


@dataclass(frozen=True)
class Ids:
    image_start_token_id: int = BOS
    image_end_token_id: int = EOS


IDS = Ids()


def text_ids(s: str) -> list[int]:
    return [130 + b for b in s.encode()]


def grid_spec(h: int, w: int) -> list[int]:
    return [SOP, *text_ids(f"{h} {w}"), EOP]


def t2i_prompt(text: str, full: tuple[int, int], preview: tuple[int, int]) -> tuple[list[int], list[list[int]]]:
    """`{text}<sop>th tw<eop><sop>ph pw<eop><bos>` and its image_grid_thw rows (full first, preview last)."""
    ids = text_ids(text) + grid_spec(*full) + grid_spec(*preview) + [BOS]
    return ids, [[1, *full], [1, *preview]]


def i2i_prompt(text: str, sources: list[tuple[int, int]], target: tuple[int, int],
               codes: list[list[int]] | None = None) -> tuple[list[int], list[list[int]]]:
    """`<bos><|image|>*n<eos>...{text}<sop>th tw<eop><bos>` (placeholders, or `codes` when given)."""
    ids: list[int] = []
    for k, (h, w) in enumerate(sources):
        ids += [BOS] + (list(codes[k]) if codes is not None else [IMAGE] * (h * w)) + [EOS]
    ids += text_ids(text) + grid_spec(*target) + [BOS]
    return ids, [[1, h, w] for h, w in sources] + [[1, *target]]


def left_pad(seqs: list[list[int]], pad: int = EOS) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded ids (padded with the real pad id = EOS, which must be ignored) and the attention mask."""
    n = max(len(s) for s in seqs)
    ids = np.array([[pad] * (n - len(s)) + s for s in seqs], np.int64)
    mask = np.array([[0] * (n - len(s)) + [1] * len(s) for s in seqs], np.int64)
    return ids, mask


@pytest.fixture(scope="module")
def hf_model():
    return tiny_ar(0)


def hf_positions(model, ids, mask, grids_per_sample):
    """transformers' prefill position ids [3, B, L] and decode position ids [3, B, N]."""
    thw = torch.tensor([g for gs in grids_per_sample for g in gs])
    per = torch.tensor([len(gs) for gs in grids_per_sample])
    pos, _ = model.model.get_rope_index(torch.tensor(ids), thw, per, torch.tensor(mask))
    return pos.numpy(), model.model._cached_decode_position_ids.permute(1, 0, 2).numpy()


def ours(ids, mask, grids_per_sample):
    pos, start = P.prompt_position_ids(ids, mask, grids_per_sample, IDS)
    gen = P.generation_grids(ids, mask, grids_per_sample, IDS)
    return pos, P.decode_position_ids(start, gen), gen


def test_t2i_positions_match_hf(hf_model):
    seq, grids = t2i_prompt("a red fox", (3, 5), (2, 3))
    ids, mask = left_pad([seq])
    pos, dec, gen = ours(ids, mask, [grids])
    ref_pos, ref_dec = hf_positions(hf_model, ids, mask, [grids])
    np.testing.assert_array_equal(pos, ref_pos)
    np.testing.assert_array_equal(dec, ref_dec)
    assert gen == [[(2, 3), (3, 5)]]                       # preview (last grid) first
    np.testing.assert_array_equal(pos[:, 0], np.tile(np.arange(len(seq)), (3, 1)))
    assert dec.shape[-1] == 2 * 3 + 3 * 5 + 1
    # preview starts at L, the full grid at L + max(2, 3)
    assert tuple(dec[:, 0, 0]) == (len(seq),) * 3
    assert tuple(dec[:, 0, 6]) == (len(seq) + 3,) * 3


def test_i2i_two_sources_match_hf(hf_model):
    seq, grids = i2i_prompt("make it blue", [(2, 3), (4, 3)], (3, 2))
    ids, mask = left_pad([seq])
    pos, dec, gen = ours(ids, mask, [grids])
    ref_pos, ref_dec = hf_positions(hf_model, ids, mask, [grids])
    np.testing.assert_array_equal(pos, ref_pos)
    np.testing.assert_array_equal(dec, ref_dec)
    assert gen == [[(3, 2)]]
    # first image: start token at 0, tokens (1, 1+r, 1+c); the counter then jumps by max(2, 3) = 3
    np.testing.assert_array_equal(pos[:, 0, 1:7], [[1] * 6, [1, 1, 1, 2, 2, 2], [1, 2, 3, 1, 2, 3]])
    assert tuple(pos[:, 0, 7]) == (4, 4, 4)


def test_left_padded_mixed_batch_matches_hf(hf_model):
    a, ga = t2i_prompt("a long prompt for a t2i sample", (4, 3), (2, 2))
    b, gb = i2i_prompt("edit", [(3, 2), (2, 4)], (2, 3))
    c, gc = t2i_prompt("hi", (1, 3), (3, 1))
    ids, mask = left_pad([a, b, c])
    assert mask.min() == 0
    pos, dec, _ = ours(ids, mask, [ga, gb, gc])
    ref_pos, ref_dec = hf_positions(hf_model, ids, mask, [ga, gb, gc])
    np.testing.assert_array_equal(pos, ref_pos)
    np.testing.assert_array_equal(dec, ref_dec)
    assert np.all(pos[:, mask == 0] == 1)


GENERATE_CASES = {
    "t2i": [t2i_prompt("fox", (2, 3), (1, 2)), t2i_prompt("a cat on a mat", (1, 3), (2, 2))],
    "i2i": [i2i_prompt("go", [(2, 3), (3, 2)], (2, 4)), i2i_prompt("make it red", [(1, 3)], (3, 1))],
}


@pytest.mark.parametrize("case", sorted(GENERATE_CASES))
def test_generate_uses_these_positions(hf_model, case):
    """Hooks the rotary embedding during a real `generate` on a left-padded batch and checks every prefill /
    decode position id it received (transformers cannot mix t2i and i2i samples in one batch)."""
    (a, ga), (b, gb) = GENERATE_CASES[case]
    ids, mask = left_pad([a, b])
    pos, dec, gen = ours(ids, mask, [ga, gb])
    n_new = max(P.num_generated_tokens(g) for g in gen)
    seen = []

    def hook(_mod, args, kwargs):
        seen.append(kwargs["position_ids"].clone())

    kw = {"image_grid_thw": torch.tensor(ga + gb), "images_per_sample": torch.tensor([len(ga), len(gb)])}
    if case == "i2i":
        n_src = sum(h * w for _, h, w in ga[:-1] + gb[:-1])
        kw["pixel_values"] = torch.randn(n_src, 3 * 16 * 16)
    h = hf_model.model.language_model.rotary_emb.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        torch.manual_seed(0)
        with torch.no_grad():
            hf_model.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                              max_new_tokens=n_new, min_new_tokens=n_new, **kw)
    finally:
        h.remove()
    assert mask.min() == 0
    np.testing.assert_array_equal(seen[0].numpy(), pos)
    steps = np.concatenate([s.numpy() for s in seen[1:]], axis=-1)
    assert steps.shape[-1] == n_new - 1                   # the last generated token is never fed back
    np.testing.assert_array_equal(steps, dec[:, :, : n_new - 1])


def test_decode_offsets_static_table():
    off = P.decode_offsets([[(2, 3)], [(1, 1), (2, 2)]])
    assert off.shape == (3, 2, 2 * 3 + 1)
    np.testing.assert_array_equal(off[:, 0], [[0] * 6 + [3], [0, 0, 0, 1, 1, 1, 3], [0, 1, 2, 0, 1, 2, 3]])
    # second sample: 1x1 at 0, 2x2 at 1, EOS at 3, then padded by repetition
    np.testing.assert_array_equal(off[:, 1], [[0, 1, 1, 1, 1, 3, 3], [0, 1, 1, 2, 2, 3, 3], [0, 1, 2, 1, 2, 3, 3]])
