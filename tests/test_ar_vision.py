"""The AR's source-image tokenizer (ViT + VQ) against transformers, on two non-square images in one call."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from conversion.apply import load_state_dict_into, torch_state_dict
from conversion.tables.ar import RULES as AR_RULES
from conversion.tables.ar_vision import RULES as VISION_RULES
from glm_jax.models.ar import ArConfig, GlmImageAR
from glm_jax.models.ar_vision import patchify, resample_positions
from tests.tiny_torch import tiny_ar
from tests.util import rel_err, torch_to_numpy_state

GRIDS = ((3, 5), (4, 2))          # one image up- and one down-sampling the 4x4 position table


@pytest.fixture(scope="module")
def models():
    torch_model = tiny_ar(seed=11)
    cfg = ArConfig.from_hf(torch_model.config.to_dict())
    ours = load_state_dict_into(GlmImageAR(cfg, rngs=nnx.Rngs(0)), torch_to_numpy_state(torch_model),
                                AR_RULES)
    return torch_model, ours


def _pixels(grids, seed=0):
    n = sum(h * w for h, w in grids)
    return np.random.default_rng(seed).standard_normal((n, 3 * 16 * 16)).astype(np.float32)


def _hf_codes(torch_model, features, grids):
    """HF's `get_image_tokens`, given the per-image `(C, gh, gw)` feature maps it iterates over (transformers 5.23
    calls `vqmodel.encode(hs[None])` for each item, so it must receive one item per image)."""
    maps, off = [], 0
    for h, w in grids:
        maps.append(torch.tensor(features[off:off + h * w]).reshape(h, w, -1).permute(2, 0, 1))
        off += h * w
    with torch.no_grad():
        return torch_model.model.get_image_tokens(maps).reshape(-1).numpy()


def test_features_match_transformers(models):
    torch_model, ours = models
    px = _pixels(GRIDS)
    thw = torch.tensor([[1, h, w] for h, w in GRIDS])
    with torch.no_grad():
        ref = torch_model.model.visual(torch.tensor(px), grid_thw=thw).last_hidden_state.numpy()
    out = jax.jit(lambda m, x: m.visual(x, GRIDS))(ours, jnp.asarray(px))
    assert rel_err(out, ref) < 1e-5


def test_vq_codes_identical(models):
    torch_model, ours = models
    px = _pixels(GRIDS, seed=1)
    thw = torch.tensor([[1, h, w] for h, w in GRIDS])
    with torch.no_grad():
        feats = torch_model.model.visual(torch.tensor(px), grid_thw=thw).last_hidden_state.numpy()
        ref = _hf_codes(torch_model, feats, GRIDS)
    codes = np.asarray(ours.image_tokens(jnp.asarray(px), GRIDS))
    assert codes.dtype == np.int32
    np.testing.assert_array_equal(codes, ref)
    assert len(np.unique(codes)) > 3          # random weights still give varied codes


def test_bf16_compute_close_to_fp32_reference(models):
    """bf16 weights and compute: features within bf16 accuracy of the fp32 reference, codes mostly unchanged."""
    torch_model, ours32 = models
    cfg = ArConfig.from_hf(torch_model.config.to_dict())
    ours = load_state_dict_into(GlmImageAR(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0)),
                                torch_to_numpy_state(torch_model), AR_RULES)
    px = _pixels(GRIDS, seed=5)
    with torch.no_grad():
        ref = torch_model.model.visual(torch.tensor(px), grid_thw=torch.tensor([[1, h, w] for h, w in GRIDS]))
    out = ours.visual(jnp.asarray(px), GRIDS)
    assert out.dtype == jnp.bfloat16
    assert rel_err(np.asarray(out.astype(jnp.float32)), ref.last_hidden_state.numpy()) < 3e-2
    codes = np.asarray(ours.vqmodel.encode(out, GRIDS))
    assert np.mean(codes == np.asarray(ours32.image_tokens(jnp.asarray(px), GRIDS))) > 0.8


def test_codes_depend_on_own_image_only(models):
    """Block-diagonal attention: a second image in the batch does not change the first image's codes/features."""
    _, ours = models
    px = _pixels(GRIDS, seed=2)
    n0 = GRIDS[0][0] * GRIDS[0][1]
    alone = np.asarray(ours.visual(jnp.asarray(px[:n0]), GRIDS[:1]))
    together = np.asarray(ours.visual(jnp.asarray(px), GRIDS))[:n0]
    assert rel_err(together, alone) < 1e-6
    np.testing.assert_array_equal(np.asarray(ours.image_tokens(jnp.asarray(px), GRIDS))[:n0],
                                  np.asarray(ours.image_tokens(jnp.asarray(px[:n0]), GRIDS[:1])))
    other = px.copy()
    other[n0:] = -other[n0:]
    changed = np.asarray(ours.visual(jnp.asarray(other), GRIDS))
    assert rel_err(changed[:n0], together) < 1e-6
    assert rel_err(changed[n0:], np.asarray(ours.visual(jnp.asarray(px), GRIDS))[n0:]) > 1e-3


def test_position_resampling_matches_grid_sample():
    table = np.random.default_rng(3).standard_normal((4, 4, 5)).astype(np.float32)
    for gh, gw in ((3, 5), (4, 2), (1, 7), (8, 8)):
        ys = ((np.arange(gh) + 0.5) / gh) * 2 - 1
        xs = ((np.arange(gw) + 0.5) / gw) * 2 - 1
        grid = torch.tensor(np.stack(np.meshgrid(xs, ys), -1), dtype=torch.float32)[None]
        ref = torch.nn.functional.grid_sample(torch.tensor(table).permute(2, 0, 1)[None], grid, mode="bilinear",
                                              align_corners=False, padding_mode="border")
        ref = ref[0].permute(1, 2, 0).reshape(gh * gw, -1).numpy()
        assert rel_err(resample_positions(jnp.asarray(table), gh, gw), ref) < 1e-6


def test_patchify_matches_hf_image_processor():
    from transformers.models.glm_image.image_processing_pil_glm_image import GlmImageImageProcessorPil
    rng = np.random.default_rng(4)
    img = rng.integers(0, 256, (48, 80, 3), dtype=np.uint8)
    proc = GlmImageImageProcessorPil(patch_size=16, temporal_patch_size=1, merge_size=1, image_mean=[0.5] * 3,
                                     image_std=[0.5] * 3, min_pixels=32 * 32, max_pixels=128 * 128)
    out = proc(images=[img], do_resize=False, return_tensors="np")
    ref = np.asarray(out["pixel_values"])
    assert tuple(np.asarray(out["image_grid_thw"])[0]) == (1, 3, 5)
    x = (img.astype(np.float32) / 255 - 0.5) / 0.5
    assert rel_err(patchify(x[None], 16), ref) < 1e-6


def test_vision_key_table_round_trip(models):
    torch_model, ours = models
    state = {k: v for k, v in torch_to_numpy_state(torch_model).items() if k.startswith(("model.visual.",
                                                                                         "model.vqmodel."))}
    full = torch_state_dict(ours, AR_RULES)
    assert all(any(r.match_torch(k) for r in VISION_RULES) for k in state)
    assert {k for k in full if k.startswith(("model.visual.", "model.vqmodel."))} == set(state)
    for k, v in state.items():
        assert full[k].tobytes() == v.tobytes(), k
