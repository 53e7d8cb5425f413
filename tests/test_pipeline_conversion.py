"""Whole-pipeline conversion: a diffusers `GlmImagePipeline` directory -> glm_jax checkpoint -> back, bit-exact,
loadable by diffusers with no missing or unexpected keys, and generating the same image as the original."""

from __future__ import annotations

import filecmp
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from conversion import from_torch, to_torch
from conversion.apply import ConversionError
from conversion.safetensors_io import SafetensorsError, list_weight_files
from glm_jax.checkpoint import load_model, read_manifest
from tests import tiny_torch
from tests.test_conversion import assert_same_tensors, read_all

SLOTS = ("vision_language_encoder", "transformer", "vae", "text_encoder")
ERRORS = (ConversionError, SafetensorsError, ValueError)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe")
    pipe = tiny_torch.tiny_pipeline(seed=2)
    src, ckpt, back = root / "src", root / "ckpt", root / "back"
    pipe.save_pretrained(src)
    assert from_torch.main(["--src", str(src), "--dst", str(ckpt)]) == 0
    assert to_torch.main(["--src", str(ckpt), "--dst", str(back)]) == 0
    return {"src": str(src), "ckpt": str(ckpt), "back": str(back), "pipe": pipe, "root": root}


def test_checkpoint_is_self_contained(dirs):
    manifest = read_manifest(dirs["ckpt"])
    assert sorted(manifest["components"]) == sorted(SLOTS)
    for slot in ("processor", "tokenizer", "scheduler"):
        assert os.path.isdir(os.path.join(dirs["ckpt"], slot))
    for slot in SLOTS:
        _, model = load_model(dirs["ckpt"], slot)
        assert model is not None


def test_round_trip_bit_exact(dirs):
    for slot in SLOTS:
        a, b = os.path.join(dirs["src"], slot), os.path.join(dirs["back"], slot)
        assert_same_tensors(read_all(a), read_all(b))
        with open(os.path.join(a, "config.json")) as f1, open(os.path.join(b, "config.json")) as f2:
            assert json.load(f1) == json.load(f2)
    for slot in ("processor", "tokenizer", "scheduler"):
        cmp = filecmp.dircmp(os.path.join(dirs["src"], slot), os.path.join(dirs["back"], slot))
        assert not cmp.left_only and not cmp.right_only and not cmp.diff_files, slot
    with open(os.path.join(dirs["src"], "model_index.json")) as f1, \
            open(os.path.join(dirs["back"], "model_index.json")) as f2:
        assert json.load(f1) == json.load(f2)


def test_exported_components_load_without_missing_keys(dirs):
    from diffusers import AutoencoderKL, GlmImageTransformer2DModel
    from transformers import GlmImageForConditionalGeneration, T5EncoderModel
    classes = {"vision_language_encoder": GlmImageForConditionalGeneration, "transformer": GlmImageTransformer2DModel,
               "vae": AutoencoderKL, "text_encoder": T5EncoderModel}
    for slot, cls in classes.items():
        _, info = cls.from_pretrained(os.path.join(dirs["back"], slot), output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], (slot, info)


def test_exported_pipeline_generates_the_same_image(dirs):
    from diffusers import GlmImagePipeline
    exported = GlmImagePipeline.from_pretrained(dirs["back"])
    g = torch.Generator().manual_seed(0)
    prior = torch.randint(0, tiny_torch.N_CODES, (1, 16), generator=g)        # 64x64 -> 4x4 DiT tokens
    latents = torch.randn(1, 16, 8, 8, generator=g)
    kw = dict(prompt='a sign that says "hi"', height=64, width=64, num_inference_steps=3, guidance_scale=1.5,
              prior_token_ids=prior, output_type="np")
    ref = dirs["pipe"](latents=latents.clone(), **kw).images
    out = exported(latents=latents.clone(), **kw).images
    assert np.abs(out - ref).max() <= 1e-5
    assert ref.std() > 1e-3


def test_converted_checkpoint_generates_with_glm_jax(dirs, tmp_path):
    """The converted pipeline runs in `glm_jax.generate` as it does in training: this tiny AR's `lm_head` has no
    row for its image-end id (129 >= 128 rows), which the sampler's ids (`ar_token_ids`) account for."""
    from glm_jax import generate
    from glm_jax.pipeline import ar_token_ids
    ar_cfg, _ = load_model(dirs["ckpt"], "vision_language_encoder")
    assert ar_cfg.image_end_token_id >= ar_cfg.text.vision_vocab_size
    assert ar_token_ids(ar_cfg) == (tiny_torch.N_CODES - 1, tiny_torch.N_CODES - 1)
    out = tmp_path / "gen"
    assert generate.main(["--ckpt", dirs["ckpt"], "--prompt", 'a sign that says "hi"', "--height", "64", "--width",
                          "64", "--steps", "2", "--out", str(out)]) == 0
    record = json.loads((out / "generation.json").read_text())
    assert [np.asarray(Image.open(out / f)).shape for f in record["files"]] == [(64, 64, 3)]


@pytest.mark.parametrize("slot", ["transformer", "vae", "text_encoder"])
def test_single_component_directory(dirs, slot, tmp_path):
    ckpt, back = tmp_path / "ckpt", tmp_path / "back"
    from_torch.convert(os.path.join(dirs["src"], slot), str(ckpt), log=lambda *_: None)
    assert list(read_manifest(str(ckpt))["components"]) == [slot]
    to_torch.export(str(ckpt), str(back))
    assert_same_tensors(read_all(os.path.join(dirs["src"], slot)), read_all(str(back)))


def test_pipeline_with_missing_component_dir(dirs, tmp_path):
    src = shutil.copytree(dirs["src"], tmp_path / "src")
    shutil.rmtree(src / "vae")
    with pytest.raises(ERRORS, match="vae"):
        from_torch.convert(str(src), str(tmp_path / "dst"), log=lambda *_: None)
    assert not (tmp_path / "dst").exists()


def test_component_in_the_wrong_slot(dirs, tmp_path):
    src = shutil.copytree(dirs["src"], tmp_path / "src")
    shutil.rmtree(src / "transformer")
    shutil.copytree(src / "vae", src / "transformer")
    with pytest.raises(ERRORS, match="transformer"):
        from_torch.convert(str(src), str(tmp_path / "dst"), log=lambda *_: None)
    assert not (tmp_path / "dst").exists()


def test_truncated_dit_leaves_no_output(dirs, tmp_path):
    src = shutil.copytree(dirs["src"], tmp_path / "src")
    path = list_weight_files(str(src / "transformer"))[0]
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(ERRORS, match="truncated"):
        from_torch.convert(str(src), str(tmp_path / "dst"), log=lambda *_: None)
    assert not (tmp_path / "dst").exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith("dst.")]


def test_embedded_checkpoint_cache_is_keyed_by_the_code_that_builds_it(tmp_path):
    """`tiny_checkpoint` reuses a cached embedded checkpoint only when the code that builds it (and the seed) is
    the same: an edit to one of the builder's files (or another seed) gives another key, so a stale copy is never
    loaded."""
    from glm_jax.tiny import builder_files, tiny_cache_key, tiny_checkpoint
    files = builder_files()
    assert any(f.endswith(os.path.join("models", "dit.py")) for f in files)
    copies = []
    for i, f in enumerate(files):
        copies.append(str(tmp_path / f"{i}.py"))
        shutil.copy(f, copies[-1])
    key = tiny_cache_key(0)
    assert tiny_cache_key(0, copies) == key and tiny_cache_key(1) != key
    # weights drawn by XLA at another optimisation level differ in last bits (the tests run at level 0)
    levels = {tiny_cache_key(0, xla_flags=f) for f in ("", "--xla_backend_optimization_level=0",
                                                       "--xla_cpu_use_thunk_runtime=true --xla_backend_optimization_level=2")}
    assert len(levels) == 3 and tiny_cache_key(0, xla_flags="--xla_force_host_platform_device_count=8") == \
        tiny_cache_key(0, xla_flags="")
    assert tiny_cache_key(0, backend="gpu") != key and tiny_cache_key(0, backend="cpu") == key   # drawn on the CPU
    with open(copies[-1], "a") as f:
        f.write("\n# an edit\n")
    assert tiny_cache_key(0, copies) != key
    cache = tmp_path / "cache"
    (cache / f"tiny-{key}").mkdir(parents=True)
    (cache / f"tiny-{key}" / "glm_jax.json").write_text("{}")
    assert tiny_checkpoint(str(cache)) == str(cache / f"tiny-{key}")       # found under its key, not rebuilt
