"""PyTorch <-> glm_jax conversion: bit-exact round trips, sharded input, dtype preservation, and clear errors."""

from __future__ import annotations

import json
import os
import shutil

import ml_dtypes
import numpy as np
import pytest
import torch

from conversion import from_torch, to_torch
from conversion.apply import ConversionError
from conversion.safetensors_io import SafetensorsError, SafetensorsFile, list_weight_files
from glm_jax.checkpoint import load_params
from tests import tiny_torch

ERRORS = (ConversionError, SafetensorsError, ValueError)


def read_all(directory: str) -> dict[str, np.ndarray]:
    out = {}
    for path in list_weight_files(directory):
        with SafetensorsFile(path) as f:
            for k in f.keys():  # noqa: SIM118 (SafetensorsFile)
                out[k] = f.load(k)
    return out


def assert_same_tensors(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k, x in a.items():
        assert x.dtype == b[k].dtype, k
        assert x.shape == b[k].shape, k
        assert x.tobytes() == b[k].tobytes(), f"{k} differs"


@pytest.fixture(scope="module")
def ar_dirs(tmp_path_factory):
    """The tiny AR saved by transformers as one file (fp32), as several shards (fp32), and in bf16."""
    root = tmp_path_factory.mktemp("ar")
    model = tiny_torch.tiny_ar(seed=3)
    single, sharded, bf16 = root / "single", root / "sharded", root / "bf16"
    model.save_pretrained(single, max_shard_size="100GB")
    model.save_pretrained(sharded, max_shard_size="300KB")
    model.to(torch.bfloat16).save_pretrained(bf16)
    return {"single": str(single), "sharded": str(sharded), "bf16": str(bf16), "root": root}


def test_sharded_source_has_several_shards(ar_dirs):
    assert len(list_weight_files(ar_dirs["sharded"])) > 2


@pytest.mark.parametrize("which", ["single", "sharded", "bf16"])
def test_ar_round_trip_bit_exact(ar_dirs, which, tmp_path, capsys):
    src = ar_dirs[which]
    ckpt, back = tmp_path / "ckpt", tmp_path / "back"
    assert from_torch.main(["--src", src, "--dst", str(ckpt)]) == 0
    capsys.readouterr()
    assert to_torch.main(["--src", str(ckpt), "--dst", str(back), "--max-shard-size", "400KB"]) == 0
    assert "exported vision_language_encoder in " in capsys.readouterr().out    # a line per component written
    assert len(list_weight_files(str(back))) > 1          # written back sharded, with an index
    assert_same_tensors(read_all(src), read_all(str(back)))
    with open(os.path.join(src, "config.json")) as f1, open(back / "config.json") as f2:
        assert json.load(f1) == json.load(f2)
    from transformers import GlmImageForConditionalGeneration
    _, info = GlmImageForConditionalGeneration.from_pretrained(str(back), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    if which == "bf16":
        params = load_params(str(ckpt / "vision_language_encoder" / "params"))
        assert all(np.asarray(v).dtype == ml_dtypes.bfloat16 for v in params.values())


def test_sharded_converts_same_as_single(ar_dirs, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    from_torch.convert(ar_dirs["single"], str(a), log=lambda *_: None)
    from_torch.convert(ar_dirs["sharded"], str(b), log=lambda *_: None)
    pa = load_params(str(a / "vision_language_encoder" / "params"))
    pb = load_params(str(b / "vision_language_encoder" / "params"))
    assert sorted(pa) == sorted(pb)
    for k in pa:
        np.testing.assert_array_equal(np.asarray(pa[k]), np.asarray(pb[k]), err_msg=k)


def _copy(src: str, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def _rewrite_single(directory: str, edit):
    """Loads the single safetensors file, applies `edit(dict)`, writes it back with the safetensors library."""
    from safetensors.numpy import save_file
    path = list_weight_files(directory)[0]
    tensors = read_all(directory)
    edit(tensors)
    os.remove(path)
    save_file(tensors, path, metadata={"format": "pt"})


def _expect_error(src: str, tmp_path, *needles: str):
    dst = tmp_path / "dst"
    with pytest.raises(ERRORS) as e:
        from_torch.convert(src, str(dst), log=lambda *_: None)
    msg = str(e.value)
    assert "\n" not in msg
    for n in needles:
        assert n in msg, msg
    assert not dst.exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith("dst.tmp")]
    return msg


def test_missing_shard(ar_dirs, tmp_path):
    src = _copy(ar_dirs["sharded"], tmp_path / "src")
    victim = sorted(p for p in os.listdir(src) if p.endswith(".safetensors"))[1]
    os.remove(os.path.join(src, victim))
    _expect_error(src, tmp_path, victim, "missing")


def test_truncated_file(ar_dirs, tmp_path):
    src = _copy(ar_dirs["single"], tmp_path / "src")
    path = list_weight_files(src)[0]
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 1000)
    _expect_error(src, tmp_path, os.path.basename(path), "truncated")


def test_wrong_shape(ar_dirs, tmp_path):
    src = _copy(ar_dirs["single"], tmp_path / "src")
    key = "model.language_model.layers.1.mlp.down_proj.weight"
    _rewrite_single(src, lambda t: t.__setitem__(key, np.zeros((7, 5), np.float32)))
    _expect_error(src, tmp_path, key, "shape")


def test_unknown_key(ar_dirs, tmp_path):
    src = _copy(ar_dirs["single"], tmp_path / "src")
    _rewrite_single(src, lambda t: t.__setitem__("model.language_model.extra_bias", np.zeros(3, np.float32)))
    _expect_error(src, tmp_path, "model.language_model.extra_bias")


def test_missing_key(ar_dirs, tmp_path):
    src = _copy(ar_dirs["single"], tmp_path / "src")
    key = "model.language_model.layers.0.self_attn.k_proj.bias"
    _rewrite_single(src, lambda t: t.pop(key))
    _expect_error(src, tmp_path, key, "missing")


def test_config_of_another_model(ar_dirs, tmp_path):
    src = _copy(ar_dirs["single"], tmp_path / "src")
    with open(os.path.join(src, "config.json"), "w") as f:
        json.dump({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, f)
    _expect_error(src, tmp_path, "config.json", "llama")


def test_cli_error_is_one_line(ar_dirs, tmp_path, capsys):
    src = _copy(ar_dirs["single"], tmp_path / "src")
    os.remove(list_weight_files(src)[0])
    assert from_torch.main(["--src", src, "--dst", str(tmp_path / "dst")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "safetensors" in err


def test_to_torch_of_a_torch_directory_says_to_convert_it_first(ar_dirs, tmp_path, capsys):
    """Handing `to_torch` (or training) the PyTorch directory instead of a converted checkpoint is a one-line
    error naming `--src` and the command that converts it; nothing is written."""
    for src, needle in [(ar_dirs["single"], "python -m conversion.from_torch --src"),
                        (str(tmp_path / "none"), "no such directory")]:
        assert to_torch.main(["--src", src, "--dst", str(tmp_path / "dst")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: --src {src}:") and "\n" not in err and needle in err, err
        assert not (tmp_path / "dst").exists()


def test_existing_destination_is_kept(ar_dirs, tmp_path):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("x")
    with pytest.raises(ConversionError, match="--overwrite"):
        from_torch.convert(ar_dirs["single"], str(dst), log=lambda *_: None)
    assert (dst / "keep.txt").read_text() == "x"
