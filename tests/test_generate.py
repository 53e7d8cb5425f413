"""`python -m glm_jax.generate` on the embedded tiny checkpoint: images and settings written, clear errors."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from glm_jax import generate
from glm_jax.tiny import tiny_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(str(tmp_path_factory.mktemp("cache")))


def _err(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    return err[-1] if err else ""


def test_t2i_writes_images_and_settings_and_the_same_seed_gives_the_same_images(ckpt, tmp_path):
    args = ["--ckpt", ckpt, "--prompt", 'a sign that says "OPEN"', "--height", "64", "--width", "96",
            "--num-images", "2", "--steps", "2", "--seed", "3"]
    out = tmp_path / "out"
    assert generate.main(args + ["--out", str(out)]) == 0
    record = json.loads((out / "generation.json").read_text())
    assert record["files"] == ["000_00.png", "000_01.png"]
    imgs = [np.asarray(Image.open(out / f)) for f in record["files"]]
    assert all(i.shape == (64, 96, 3) and i.dtype == np.uint8 for i in imgs)
    assert not np.array_equal(imgs[0], imgs[1])          # each image has its own AR sample and noise
    assert record["ar_tokens_per_image"] == 13 * 19 + 2 * 3 + 1
    assert {"ar_s", "dit_s", "decode_s", "total_s"} <= set(record["timings"])
    assert generate.main(args + ["--out", str(tmp_path / "again")]) == 0
    for f, img in zip(record["files"], imgs, strict=True):
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "again" / f)), img)


def test_i2i_with_a_source(ckpt, tmp_path):
    src = tmp_path / "src.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 96, 3), dtype=np.uint8)).save(src)
    out = tmp_path / "out"
    assert generate.main(["--ckpt", ckpt, "--prompt", "make it green", "--image", str(src), "--height", "64",
                          "--width", "96", "--steps", "2", "--out", str(out)]) == 0
    assert np.asarray(Image.open(out / "000_00.png")).shape == (64, 96, 3)


@pytest.mark.parametrize("size,needle", [(("70", "64"), "multiples of 32"), (("4096", "4096"), "range")])
def test_bad_sizes(ckpt, tmp_path, capsys, size, needle):
    rc = generate.main(["--ckpt", ckpt, "--prompt", "x", "--height", size[0], "--width", size[1], "--out",
                        str(tmp_path / "o")])
    assert rc == 2
    assert needle in _err(capsys)


def test_source_breaking_the_size_rule(ckpt, tmp_path, capsys):
    src = tmp_path / "odd.png"
    Image.fromarray(np.zeros((70, 50, 3), np.uint8)).save(src)           # AR grid 2x2 vs VAE grid 3x4
    rc = generate.main(["--ckpt", ckpt, "--prompt", "x", "--image", str(src), "--height", "64", "--width", "64",
                        "--out", str(tmp_path / "o")])
    assert rc == 2
    assert "50x70" in _err(capsys) or "70" in _err(capsys)


def test_missing_files(ckpt, tmp_path, capsys):
    assert generate.main(["--ckpt", ckpt, "--prompt", "x", "--image", "/nope.png", "--height", "64", "--width",
                          "64", "--out", str(tmp_path / "o")]) == 2
    assert "/nope.png" in _err(capsys)
    assert generate.main(["--ckpt", str(tmp_path / "none"), "--prompt", "x", "--height", "64", "--width", "64",
                          "--out", str(tmp_path / "o")]) == 2
    assert "not found" in _err(capsys)
    assert generate.main(["--ckpt", ckpt, "--prompts-file", str(tmp_path / "p.txt"), "--height", "64", "--width",
                          "64", "--out", str(tmp_path / "o")]) == 2
    assert "p.txt" in _err(capsys)


def test_checkpoint_without_a_component(ckpt, tmp_path, capsys):
    partial = shutil.copytree(ckpt, tmp_path / "partial")
    manifest = json.loads((partial / "glm_jax.json").read_text())
    del manifest["components"]["transformer"]
    (partial / "glm_jax.json").write_text(json.dumps(manifest))
    rc = generate.main(["--ckpt", str(partial), "--prompt", "x", "--height", "64", "--width", "64", "--out",
                        str(tmp_path / "o")])
    assert rc == 2
    assert "transformer" in _err(capsys)
    assert not os.path.exists(tmp_path / "o")
