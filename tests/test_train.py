"""`python -m glm_jax.train` on the embedded tiny model: each component mode runs, checkpoints resume exactly,
and bad configs stop with one line naming the field."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from glm_jax import train
from glm_jax.config import ConfigError, apply_overrides, load_config, validate

FAST = ["--config.train.steps=2", "--config.ar.decode_steps=2", "--config.dit.num_steps=4",
        "--config.ar.group_size=2", "--config.dit.group_size=2", "--config.log.images_every=2"]


@pytest.mark.parametrize("component", ["ar", "dit", "both"])
def test_cli_runs_each_component(component, tmp_path, capsys):
    work = tmp_path / "run"
    assert train.main(["--config", f"configs/t2i.py:tiny,{component}", "--workdir", str(work), *FAST]) == 0
    cfg = json.loads((work / "config.json").read_text())
    assert cfg["component"] == component and cfg["train"]["steps"] == 2
    assert "2" in os.listdir(work / "checkpoints")
    assert any(f.startswith("events") for f in os.listdir(work / "tensorboard"))
    assert any(f.endswith("_000002.png") for f in os.listdir(work / "images"))
    err = capsys.readouterr().err
    assert "step 2/2" in err and "checkpoints:" in err


def _params_at(work, step: int) -> dict:
    import orbax.checkpoint as ocp
    path = os.path.join(work, "checkpoints", str(step), "state")
    import jax
    tree = ocp.StandardCheckpointer().restore(os.path.abspath(path))
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def test_resume_is_exact(tmp_path, capsys):
    base = ["--config", "configs/t2i.py:tiny,dit", *FAST[1:], "--config.checkpoint.every=1"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert train.main([*base, "--workdir", str(straight), "--config.train.steps=3"]) == 0
    cfg = validate(apply_overrides(load_config("configs/t2i.py:tiny,dit"),
                                   {a[len("--config."):].split("=")[0]: a.split("=", 1)[1]
                                    for a in [*FAST[1:], "--config.checkpoint.every=1", "--config.train.steps=3"]}))
    train.train(cfg, str(resumed), log=lambda *_: None, stop_after=2)        # interrupted after step 2
    assert sorted(os.listdir(resumed / "checkpoints")) == ["1", "2"]
    capsys.readouterr()
    assert train.main([*base, "--workdir", str(resumed), "--config.train.steps=3"]) == 0
    assert "resumed" in capsys.readouterr().err
    a, b = _params_at(straight, 3), _params_at(resumed, 3)
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)
    p2 = _params_at(straight, 2)
    moved = any(not np.array_equal(np.asarray(p2[k]), np.asarray(a[k])) for k in a if "params" in k)
    assert moved                                   # the update changed the trained parameters


@pytest.mark.parametrize("override,needle", [
    ("--config.train.stepz=3", "train.stepz"),
    ("--config.train.steps=abc", "train.steps"),
    ("--config.image.height=100", "image.height"),
    ("--config.component=all", "component"),
    ("--config.ar.group_size=1", "ar.group_size"),
])
def test_bad_config_is_one_line(override, needle, tmp_path, capsys):
    rc = train.main(["--config", "configs/t2i.py:tiny", "--workdir", str(tmp_path / "w"), override])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and needle in err


def test_unknown_variant_and_missing_data(tmp_path):
    with pytest.raises(ConfigError, match="variant"):
        load_config("configs/t2i.py:tiny,huge")
    cfg = validate(apply_overrides(load_config("configs/t2i.py:tiny"), {"data.path": str(tmp_path / "none")}))
    with pytest.raises(ValueError, match="none"):
        train.train(cfg, str(tmp_path / "w"), log=lambda *_: None)
