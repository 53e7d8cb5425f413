"""Prompt building equals transformers' `GlmImageProcessor` (tiny tokenizer, PIL image processor, real chat template)
and the diffusers pipeline's VAE-path preprocessing; position ids equal `GlmImageModel.get_rope_index`; bad input
and bad processor folders give one-line errors."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import PIL.Image
import pytest
import torch

from glm_jax.prompts import PromptBuilder
from glm_jax.tiny import CHAT_TEMPLATE, tiny_tokenizer, write_tiny_processor
from tests.tiny_torch import tiny_ar

SPECIAL = {"bos_token": "<|dit_token_16384|>", "eos_token": "<|dit_token_16385|>",
           "pad_token": "<|dit_token_16385|>", "padding_side": "left",
           "extra_special_tokens": {"image_token": "<|image|>", "grid_bos_token": "<sop>", "grid_eos_token": "<eop>"}}


def hf_processor(tokenizer=None):
    """The hub-free tiny `GlmImageProcessor`: real preprocessor values except min/max pixels 32^2/128^2."""
    from transformers import GlmImageProcessor, TokenizersBackend
    from transformers.models.glm_image.image_processing_pil_glm_image import GlmImageImageProcessorPil
    tok = TokenizersBackend(tokenizer_object=tokenizer or tiny_tokenizer(), **SPECIAL)
    ip = GlmImageImageProcessorPil(patch_size=16, temporal_patch_size=1, merge_size=1, image_mean=[0.5] * 3,
                                   image_std=[0.5] * 3, resample=3, rescale_factor=1 / 255, min_pixels=32 * 32,
                                   max_pixels=128 * 128)
    return GlmImageProcessor(image_processor=ip, tokenizer=tok, chat_template=CHAT_TEMPLATE)


def hf_call(proc, prompts, height, width, sources=None) -> dict:
    """What the pipeline's `generate_prior_tokens` feeds to the processor, as numpy."""
    msgs = []
    for i, p in enumerate(prompts):
        content = [{"type": "image", "image": im} for im in (sources[i] if sources else [])]
        msgs.append([{"role": "user", "content": content + [{"type": "text", "text": p}]}])
    out = proc.apply_chat_template(msgs, tokenize=True, padding=len(prompts) > 1, target_h=height, target_w=width,
                                   return_dict=True, return_tensors="pt")
    return {k: v.numpy() for k, v in out.items()}


def image(h, w, seed, channels=3):
    return PIL.Image.fromarray(np.random.RandomState(seed).randint(0, 256, (h, w, channels), dtype=np.uint8))


@pytest.fixture(scope="module")
def hf():
    return hf_processor()


@pytest.fixture(scope="module")
def ours():
    return PromptBuilder.tiny()


@pytest.fixture(scope="module")
def hf_model():
    return tiny_ar(0)


def assert_same_tokens(batch, ref):
    np.testing.assert_array_equal(batch.input_ids, ref["input_ids"])
    np.testing.assert_array_equal(batch.attention_mask, ref["attention_mask"])
    np.testing.assert_array_equal(batch.image_grid_thw, ref["image_grid_thw"])
    np.testing.assert_array_equal(batch.images_per_sample, ref["images_per_sample"])


def assert_positions_match(model, batch):
    pos, _ = model.model.get_rope_index(torch.tensor(batch.input_ids, dtype=torch.long),
                                        torch.tensor(batch.image_grid_thw), torch.tensor(batch.images_per_sample),
                                        torch.tensor(batch.attention_mask, dtype=torch.long))
    np.testing.assert_array_equal(batch.position_ids, pos.numpy())
    dec = model.model._cached_decode_position_ids.permute(1, 0, 2).numpy()
    np.testing.assert_array_equal(batch.decode_position_ids, dec)
    assert batch.decode_position_ids.shape[-1] == batch.num_new_tokens


@pytest.mark.parametrize("hw", [(64, 96), (96, 64), (64, 64)])
def test_t2i_single_prompt_matches_hf(hf, ours, hf_model, hw):
    batch = ours.build_t2i(["A cat on a mat"], *hw)
    assert_same_tokens(batch, hf_call(hf, ["A cat on a mat"], *hw))
    assert_positions_match(hf_model, batch)
    (th, tw), (ph, pw) = batch.target_grid, batch.preview_grid
    assert (th, tw) == (hw[0] // 32, hw[1] // 32)
    assert batch.gen_grids == [[(ph, pw), (th, tw)]]       # preview is generated first
    assert batch.num_new_tokens == ph * pw + th * tw + 1 and batch.target_offset == ph * pw
    assert batch.texts[0].endswith(f"<sop>{th} {tw}<eop><sop>{ph} {pw}<eop><|dit_token_16384|>")


def test_t2i_batch_of_different_lengths_is_left_padded_like_hf(hf, ours, hf_model):
    prompts = ["a fox", "ein großer Bär im Schnee, 'Hallo' sagt er", "x"]
    batch = ours.build_t2i(prompts, 96, 64)
    ref = hf_call(hf, prompts, 96, 64)
    assert_same_tokens(batch, ref)
    assert batch.attention_mask.min() == 0 and batch.attention_mask[:, -1].all()
    assert np.all(batch.input_ids[batch.attention_mask == 0] == ours.pad_id)
    assert_positions_match(hf_model, batch)


def test_i2i_one_source_matches_hf(hf, ours, hf_model):
    src = [[image(100, 70, 0)]]                               # not a multiple of 32, but the two paths agree
    batch = ours.build_i2i(["make it blue"], src, 64, 96)
    ref = hf_call(hf, ["make it blue"], 64, 96, src)
    assert_same_tokens(batch, ref)
    np.testing.assert_allclose(batch.pixel_values, ref["pixel_values"], rtol=0, atol=1e-6)
    assert batch.pixel_values.dtype == np.float32 and batch.pixel_values.shape == (3 * 2, 768)
    assert batch.source_grids == [[(3, 2)]] and batch.gen_grids == [[(2, 3)]]
    assert batch.num_new_tokens == 2 * 3 + 1 and batch.target_offset == 0
    assert_positions_match(hf_model, batch)


def test_i2i_two_sources_of_different_sizes_batched_matches_hf(hf, ours, hf_model):
    src = [[image(64, 96, 1), image(128, 64, 2, channels=4)],     # RGBA: composited onto white
           [image(96, 96, 3), np.asarray(image(64, 128, 4))]]     # numpy uint8 is taken as PIL
    prompts = ["turn the sky into a sunset", "red"]
    batch = ours.build_i2i(prompts, src, 96, 96)
    ref = hf_call(hf, prompts, 96, 96, [[s[0], s[1] if not isinstance(s[1], np.ndarray) else
                                         PIL.Image.fromarray(s[1])] for s in src])
    assert_same_tokens(batch, ref)
    np.testing.assert_allclose(batch.pixel_values, ref["pixel_values"], rtol=0, atol=1e-6)
    assert batch.source_grids == [[(2, 3), (4, 2)], [(3, 3), (2, 4)]]
    assert batch.source_grids_flat == ((2, 3), (4, 2), (3, 3), (2, 4))
    assert batch.attention_mask.min() == 0
    assert_positions_match(hf_model, batch)


def test_vae_sources_match_the_pipeline(ours):
    from diffusers.image_processor import VaeImageProcessor
    vae_proc = VaeImageProcessor(vae_scale_factor=8)        # what GlmImagePipeline builds
    src = [[image(100, 70, 5), image(64, 96, 6)]]
    batch = ours.build_i2i(["p"], src, 64, 64)
    for img, got in zip(src[0], batch.vae_sources[0]):
        h, w = img.height // 16 * 16, img.width // 16 * 16
        ref = vae_proc.preprocess(img, height=h, width=w)[0].permute(1, 2, 0).numpy()
        assert got.shape == (h, w, 3) and got.dtype == np.float32
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)
    # the agreement rule: DiT token grid of the VAE path == 2x the AR grid
    for (gh, gw), v in zip(batch.source_grids[0], batch.vae_sources[0]):
        assert (v.shape[0] // 16, v.shape[1] // 16) == (2 * gh, 2 * gw)


def one_line_error(fn, *args, match: str, exc=ValueError):
    with pytest.raises(exc, match=match) as e:
        fn(*args)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_bad_inputs_give_one_line_errors(ours):
    img = image(64, 64, 0)
    one_line_error(ours.build_t2i, ["a"], 80, 64, match="height 80 is not a multiple of 32")
    one_line_error(ours.build_t2i, ["a"], 64, 160, match=r"width 160 is outside the model's range \[32, 128\]")
    one_line_error(ours.build_t2i, ["a <|image|> b"], 64, 64, match="prompt 0 contains the control token")
    one_line_error(ours.build_t2i, "a", 64, 64, match="list of strings", exc=TypeError)
    one_line_error(ours.build, ["a", "b"], 64, 64, [[img], []], match="mixed text-to-image and image-to-image")
    one_line_error(ours.build_i2i, ["a", "b"], [[img], [img, img]], 64, 64, match="same number of source images")
    one_line_error(ours.build_i2i, ["a"], [[img], [img]], 64, 64, match="2 source-image lists for 1 prompts")
    one_line_error(ours.build_i2i, ["a"], [[np.zeros((64, 64, 3), np.float32)]], 64, 64, match="uint8")
    # 48x40: AR grid (round(24/16), round(20/16)) = 2x1 -> 4x2 at DiT resolution, but the VAE path gives 3x2
    msg = one_line_error(ours.build_i2i, ["a"], [[img, image(48, 40, 1)]], 64, 64,
                         match=r"sample 0 source 1 is 40x48 \(WxH\)")
    assert "2x1 grid (4x2 at DiT resolution)" in msg and "VAE path gives 3x2" in msg and "e.g. 32x64" in msg
    msg = one_line_error(ours.build_i2i, ["a"], [[image(200, 200, 2)]], 64, 64, match="source 0 is 200x200")
    assert "multiples of 32 in [32, 128]" in msg
    one_line_error(ours.build_i2i, ["a"], [[image(20, 120, 2)]], 64, 64, match="aspect ratio 6 is above 4")


def test_round_trip_through_a_saved_hf_processor(hf, ours, tmp_path):
    hf.save_pretrained(tmp_path)                     # processor_config.json holds the image-processor values
    loaded = PromptBuilder.from_dir(str(tmp_path))
    src = [[image(100, 70, 7)], [image(64, 64, 8)]]
    for a, b in [(loaded.build_t2i(["a", "bcd"], 64, 96), ours.build_t2i(["a", "bcd"], 64, 96)),
                 (loaded.build_i2i(["a", "bcd"], src, 64, 96), ours.build_i2i(["a", "bcd"], src, 64, 96))]:
        for k in ("input_ids", "attention_mask", "position_ids", "decode_position_ids", "pixel_values"):
            np.testing.assert_array_equal(getattr(a, k), getattr(b, k))
        assert a.image_grids == b.image_grids and a.texts == b.texts
    # the checkpoint layout (preprocessor_config.json) read by transformers gives the same as ours
    from transformers import GlmImageProcessor
    ckpt = tmp_path / "ckpt"
    write_tiny_processor(str(ckpt))
    ref = hf_call(GlmImageProcessor.from_pretrained(str(ckpt)), ["a", "bcd"], 64, 96, src)
    batch = PromptBuilder.from_dir(str(ckpt)).build_i2i(["a", "bcd"], src, 64, 96)
    assert_same_tokens(batch, ref)
    np.testing.assert_allclose(batch.pixel_values, ref["pixel_values"], rtol=0, atol=1e-6)


def test_tokenizer_post_processor_is_applied_like_transformers(tmp_path):
    """A tokenizer.json post-processor adds its tokens to t2i prompts only (transformers skips special tokens when
    the rendered prompt starts with BOS, as i2i prompts do); `add_bos_token` in the config is ignored when
    tokenizer.json exists, as transformers ignores it."""
    from tokenizers import processors
    from transformers import GlmImageProcessor
    tok = tiny_tokenizer()
    tok.post_processor = processors.TemplateProcessing(single="<|endoftext|> $A", pair="<|endoftext|> $A $B",
                                                       special_tokens=[("<|endoftext|>", 389)])
    hf_processor(tok).save_pretrained(tmp_path)
    cfg_file = tmp_path / "tokenizer_config.json"
    src = [[image(64, 96, 9)]]
    for add_bos in (None, True):
        if add_bos is not None:
            cfg = json.loads(cfg_file.read_text())
            cfg["add_bos_token"] = add_bos
            cfg_file.write_text(json.dumps(cfg))
        hf = GlmImageProcessor.from_pretrained(str(tmp_path))
        ours = PromptBuilder.from_dir(str(tmp_path))
        t2i = ours.build_t2i(["a b", "c"], 64, 64)
        assert_same_tokens(t2i, hf_call(hf, ["a b", "c"], 64, 64))
        assert t2i.input_ids[1, -t2i.attention_mask[1].sum()] == 389
        assert_same_tokens(ours.build_i2i(["a"], src, 64, 64), hf_call(hf, ["a"], 64, 64, src))


def test_bad_processor_folders_give_one_line_errors(tmp_path):
    good = tmp_path / "good"
    write_tiny_processor(str(good))

    def variant(name, edit):
        d = tmp_path / name
        shutil.copytree(good, d)
        edit(d)
        return str(d)

    def load(d):
        return PromptBuilder.from_dir(d)

    one_line_error(load, str(tmp_path / "nope"), match="processor folder not found", exc=FileNotFoundError)
    d = variant("no_tok", lambda d: os.remove(d / "tokenizer.json"))
    one_line_error(load, d, match="tokenizer.json: missing", exc=FileNotFoundError)
    d = variant("bad_tok", lambda d: (d / "tokenizer.json").write_text('{"model": 3}'))
    one_line_error(load, d, match="tokenizer.json: not a valid tokenizers file")
    d = variant("bad_cfg", lambda d: (d / "tokenizer_config.json").write_text("{bos"))
    one_line_error(load, d, match="tokenizer_config.json: not valid JSON")

    def drop_pad(d):
        cfg = json.loads((d / "tokenizer_config.json").read_text())
        del cfg["pad_token"]
        (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    one_line_error(load, variant("no_pad", drop_pad), match="tokenizer_config.json: missing pad_token")
    d = variant("no_tmpl", lambda d: os.remove(d / "chat_template.jinja"))
    one_line_error(load, d, match="chat_template.jinja: missing", exc=FileNotFoundError)
    d = variant("bad_tmpl", lambda d: (d / "chat_template.jinja").write_text("{% for m in %}"))
    one_line_error(load, d, match="the chat template does not compile")
    d = variant("no_pre", lambda d: os.remove(d / "preprocessor_config.json"))
    one_line_error(load, d, match="preprocessor_config.json: missing", exc=FileNotFoundError)
    d = variant("bad_pre", lambda d: (d / "preprocessor_config.json").write_text('{"patch_size": 16}'))
    one_line_error(load, d, match="preprocessor_config.json: needs min_pixels")
