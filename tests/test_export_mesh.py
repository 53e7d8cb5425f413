"""Checkpoints written on a mesh, used on another device count: a tiny T2I DiT run trained on 4 forced CPU devices
(`data=1 x fsdp=4`, EMA on) in a subprocess exports in this process (one device) to a checkpoint whose DiT params
(and EMA with `--ema`) equal an independent restore of the run's state and that loads with `load_model` /
`GlmImageStack.load`, reading only the exported arrays (no optimizer state); the run's step-2 checkpoint resumed
on 2 devices runs step 3 to the state of the 4-device run's own step 3 (fp32 tolerance)."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tests.util import CPU_XLA_FLAGS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# tiny shapes (the `FAST` set of tests/test_train.py), no evaluation, a checkpoint every step, an EMA
ARGS = ["--config.train.steps=3", "--config.dit.num_steps=4", "--config.dit.group_size=2",
        "--config.log.images_every=0", "--config.log.eval_every=0", "--config.checkpoint.every=1",
        "--config.ema.decay=0.9"]
SPEC = "configs/t2i.py:tiny,dit"


def _spawn(devices: int, workdir, args: list[str]) -> subprocess.Popen:
    """`python -m glm_jax.train` on `devices` forced CPU devices (mesh `data=1 x fsdp=devices`) in a
    subprocess."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_DEFAULT_MATMUL_PRECISION="highest",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {CPU_XLA_FLAGS}")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    argv = ["--config", SPEC, "--workdir", str(workdir), *args, "--config.mesh.data=1",
            f"--config.mesh.fsdp={devices}"]
    code = f"import sys\nfrom glm_jax import train\nsys.exit(train.main({argv!r}))\n"
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait(proc: subprocess.Popen) -> str:
    """The stderr of a finished `_spawn` run (which must have succeeded)."""
    try:
        err = proc.communicate(timeout=600)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-3000:]
    return err


def _state_path(work, step: int) -> str:
    return os.path.abspath(os.path.join(work, "checkpoints", str(step), "state"))


def _restore(work, step: int) -> dict[str, np.ndarray]:
    """The whole saved state of `work` at `step` restored onto this process's first device (a target of the saved
    shapes and dtypes, whatever mesh saved it), flattened to `{"dit.params.<nnx path>": array}` (the `.value`
    level of saved variables dropped)."""
    import jax
    import orbax.checkpoint as ocp
    ckpt = ocp.StandardCheckpointer()
    path = _state_path(work, step)
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one),
                          ckpt.metadata(path).item_metadata)
    out = {}
    for keys, v in jax.tree_util.tree_leaves_with_path(ckpt.restore(path, target)):
        names = [str(getattr(k, "key", getattr(k, "idx", k))) for k in keys]
        out[".".join(names[:-1] if names[-1] == "value" else names)] = np.asarray(v)
    return out


def _group(state: dict, prefix: str) -> dict[str, np.ndarray]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _flat_params(state) -> dict[str, np.ndarray]:
    from flax import nnx
    return {".".join(str(p) for p in path): np.asarray(v.get_value())
            for path, v in nnx.to_flat_state(state) if isinstance(v, nnx.Param)}


def _vec(group: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(group[k], np.float64).ravel() for k in sorted(group)])


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _chunk_reads() -> int:
    """Chunks tensorstore has read in this process so far (each stored array chunk counts once per read)."""
    import tensorstore as ts
    for m in ts.experimental_collect_matching_metrics("/tensorstore/cache/chunk_cache/reads"):
        return int(sum(v["value"] for v in m["values"]))
    return 0


def _chunks(meta_tree) -> int:
    """Number of stored chunks of the arrays in an orbax metadata (sub)tree."""
    import jax
    return sum(math.prod(math.ceil(s / c) for s, c in zip(m.shape, m.storage.chunk_shape))
               for m in jax.tree.leaves(meta_tree))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 3-step run on 4 devices (`four`), then a copy of it without its step-3 checkpoint resumed on 2 devices
    (`two`); training data without an eval split."""
    root = tmp_path_factory.mktemp("export_mesh")
    data = root / "data"
    data.mkdir()
    shutil.copy(os.path.join(ROOT, "data", "t2i", "prompts.txt"), data)
    shutil.copytree(os.path.join(ROOT, "data", "t2i", "target_images"), data / "target_images")
    args = [*ARGS, f"--config.data.path={data}"]
    four, two = root / "fsdp4", root / "fsdp2"
    err4 = _wait(_spawn(4, four, args))
    shutil.copytree(four, two)
    shutil.rmtree(two / "checkpoints" / "3")
    err2 = _wait(_spawn(2, two, args))
    return four, two, err4, err2


def test_export_of_a_4_device_run_reads_only_the_params(runs, tmp_path):
    import jax
    import orbax.checkpoint as ocp

    from glm_jax import export
    from glm_jax.checkpoint import load_model
    from glm_jax.pipeline import GlmImageStack
    four, _, err4, _ = runs
    assert "mesh: data=1 x fsdp=4 x tensor=1 over 4 devices" in err4 and "step 3/3" in err4
    path = _state_path(four, 3)
    meta = ocp.StandardCheckpointer().metadata(path).item_metadata.tree
    saved_devices = {int(np.prod(m.sharding.shape)) for m in jax.tree.leaves(meta["dit"]["params"])}
    assert saved_devices == {4}            # saved on a 4-device mesh; this process has one device (conftest)

    before = _chunk_reads()
    step, trained = export.run_params(str(four))
    params_read = _chunk_reads() - before
    assert step == 3 and list(trained) == ["dit"]
    ref = _restore(four, 3)
    everything = _chunk_reads() - before - params_read
    # exactly the params' chunks are read; the reference restore of the whole state (optimizer moments, EMA, RNG,
    # step) reads every chunk, with the same counter
    assert params_read == _chunks(meta["dit"]["params"])
    assert everything == _chunks(meta) > 3 * params_read
    want = _group(ref, "dit.params.")
    assert sorted(trained["dit"]) == sorted(want)
    for k, v in want.items():
        got = trained["dit"][k]
        assert isinstance(got, np.ndarray) and got.dtype == v.dtype, k
        np.testing.assert_array_equal(got, v, err_msg=k)

    out = tmp_path / "ckpt"
    assert export.main(["--workdir", str(four), "--out", str(out)]) == 0
    _, dit = load_model(str(out), "transformer")
    from flax import nnx
    got = _flat_params(nnx.state(dit))
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)
    stack = GlmImageStack.load(str(out), components=("dit",))
    got = _flat_params(stack.dit.state)
    for k, v in want.items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)


def test_export_ema_of_a_4_device_run(runs, tmp_path):
    from flax import nnx

    from glm_jax import export
    from glm_jax.checkpoint import load_model
    four, _, _, _ = runs
    out = tmp_path / "ema"
    assert export.main(["--workdir", str(four), "--out", str(out), "--ema", "--step", "1"]) == 0
    ref = _restore(four, 1)
    want, params = _group(ref, "ema.dit."), _group(ref, "dit.params.")
    assert sorted(want) == sorted(params) and _rel(_vec(want), _vec(params)) > 1e-4   # the EMA is not the params
    _, dit = load_model(str(out), "transformer")
    got = _flat_params(nnx.state(dit))
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)


def test_resume_on_2_devices_continues_the_4_device_run(runs):
    four, two, _, err2 = runs
    assert "mesh: data=1 x fsdp=2 x tensor=1 over 2 devices" in err2
    assert "resumed from" in err2 and "at step 2" in err2 and "step 3/3" in err2
    a, b, before = _restore(four, 3), _restore(two, 3), _restore(four, 2)
    assert sorted(a) == sorted(b)
    assert _rel(_vec(_group(a, "dit.params.")), _vec(_group(before, "dit.params."))) > 1e-3   # step 3 moved them
    for group in ("dit.params.", "dit.opt_state.", "ema.dit."):
        assert _rel(_vec(_group(b, group)), _vec(_group(a, group))) < 1e-5, group
    assert b["step"] == a["step"] == 3
    np.testing.assert_array_equal(b["rng"], a["rng"])
