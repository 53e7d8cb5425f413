"""`python -m glm_jax.train` on a mesh of several devices: 4 forced CPU devices of one process (a subprocess), and
2 processes of one CPU device each started by `python -m glm_jax.launch` (gloo collectives; each process loads
and scores its own prompts, and the final evaluation's grid gathers both processes' rows). FSDP steps of the tiny
T2I DiT give the trained params of the one-device run (fp32 tolerance), the steps after a resume from the
checkpoint restored into the sharded state; a mesh that does not fit the devices and update batches that do not
split over the batch axes stop with one line naming the field.

Checkpoints written on a mesh, used on another device count: the 4-device run (EMA on) exports in this process
(one device) to a checkpoint whose DiT params (and EMA with `--ema`) equal an independent restore of the run's
state and that loads with `load_model` / `GlmImageStack.load`, reading only the exported arrays (no optimizer
state); its step-2 checkpoint resumed on 2 devices runs step 3 to the state of its own step 3 (fp32 tolerance)."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import numpy as np
import pytest

from glm_jax import train
from tests.util import CACHE_VARS, CPU_XLA_FLAGS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# tiny shapes (the `FAST` set of tests/test_train.py), no evaluation, a checkpoint every step, an EMA
ARGS = ["--config.train.steps=3", "--config.dit.num_steps=4", "--config.dit.group_size=2",
        "--config.log.images_every=0", "--config.log.eval_every=0", "--config.checkpoint.every=1",
        "--config.ema.decay=0.9"]
SPEC = "configs/t2i.py:tiny,dit"


def _env(devices: int) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_DEFAULT_MATMUL_PRECISION="highest",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {CPU_XLA_FLAGS}")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _script(devices: int, body: str) -> subprocess.Popen:
    code = "import sys\nfrom glm_jax import train\n" + textwrap.dedent(body)
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=_env(devices), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _launch(nproc: int, body: str) -> subprocess.Popen:
    """`body` run by `nproc` processes of one CPU device each (`python -m glm_jax.launch --no-python`)."""
    code = "import sys\nfrom glm_jax import distributed, train\ndistributed.initialize()\n" + textwrap.dedent(body)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("JAX_", "SLURM_", "XLA_FLAGS")) or k in CACHE_VARS}
    env.update(JAX_PLATFORMS="cpu", JAX_DEFAULT_MATMUL_PRECISION="highest", XLA_FLAGS=CPU_XLA_FLAGS,
               PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, "-m", "glm_jax.launch", "--nproc", str(nproc), "--no-python", "--",
                             sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _wait(proc: subprocess.Popen) -> str:
    """The stderr of a finished `_script` run (which must have succeeded)."""
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


def _params(work, step: int) -> np.ndarray:
    """The trained params of `work`'s checkpoint at `step`, flattened in name order."""
    return _vec(_group(_restore(work, step), "dit.params."))


# Tolerance on the trained params against the one-device run. The rollouts agree to ~1e-7, but the reward images
# are uint8: a pixel that rounds the other way moves a reward by ~1e-6 against within-group spreads of ~2e-3, so
# advantages differ by ~3e-5 relative, and Adam's first steps (about lr * sign(g)) can flip on near-zero gradient
# coordinates. Measured: 2.5e-6 / 1.1e-5 after steps 1 / 2 (4e-8 / 4e-7 with another compilation of the same
# rollout; 9e-8 / 4.2e-6 / 4.6e-6 after steps 1 / 2 / 3 on 2026-11-29); a wrong update (a dropped micro-batch, a
# wrong shard) differs by the size of a step, 2.4e-2.
TOL = 1e-4


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same 3-step run on a 4-device mesh (`data=1 x fsdp=4`, `mesh.gather_trained`) in a subprocess, on 2
    processes (`fsdp=2`), both stopped after step 1 and resumed, and on one device in this process, concurrently
    (training data without an eval split, except in the 2-process run, which evaluates at its end); then a copy
    of the 4-device run without its step-3 checkpoint resumed on 2 devices."""
    import jax
    root = tmp_path_factory.mktemp("sharded")
    data = root / "data"
    data.mkdir()
    shutil.copy(os.path.join(ROOT, "data", "t2i", "prompts.txt"), data)
    shutil.copytree(os.path.join(ROOT, "data", "t2i", "target_images"), data / "target_images")
    data_eval = root / "data_eval"          # the same training split plus the eval split, for the 2-process run
    shutil.copytree(os.path.join(ROOT, "data", "t2i"), data_eval)
    args = [*ARGS, f"--config.data.path={data}"]
    r = SimpleNamespace(four=root / "fsdp4", two=root / "fsdp2", single=root / "one", multi=root / "two_processes")
    body = """
        from glm_jax.config import apply_overrides, load_config, validate
        args = {args!r}
        cfg = validate(apply_overrides(load_config({spec!r}), dict(a[9:].split("=", 1) for a in args)))
        train.train(cfg, {work!r}, log=lambda m: print(m, file=sys.stderr), stop_after=1)
        assert train.main(["--config", {spec!r}, "--workdir", {work!r}, *args]) == 0
    """
    mesh = ["--config.mesh.data=1", "--config.mesh.fsdp=-1"]
    # the 4-device run with the trained weights gathered once per update; the 2-process run without
    four_args = [*args, *mesh, "--config.mesh.gather_trained=true"]
    proc = _script(4, body.format(args=four_args, spec=SPEC, work=str(r.four)))
    procs = _launch(2, body.format(args=[*ARGS, f"--config.data.path={data_eval}", "--config.log.eval_num_steps=2",
                                         *mesh], spec=SPEC, work=str(r.multi)))
    two = None
    try:
        if jax.device_count() == 1:
            assert train.main(["--config", SPEC, "--workdir", str(r.single), *args, "--config.mesh.data=1"]) == 0
        else:           # this process sees several devices: the one-device run needs its own process
            _wait(_script(1, f"""
                assert train.main(["--config", {SPEC!r}, "--workdir", {str(r.single)!r}, *{args!r},
                                   "--config.mesh.data=1"]) == 0
            """))
        r.err4 = _wait(proc)
        shutil.copytree(r.four, r.two)
        shutil.rmtree(r.two / "checkpoints" / "3")
        two = _script(2, f"""
            assert train.main(["--config", {SPEC!r}, "--workdir", {str(r.two)!r}, *{four_args!r}]) == 0
        """)
        r.log_multi = procs.communicate(timeout=600)[0]
        assert procs.returncode == 0, r.log_multi[-3000:]
        r.err2 = _wait(two)
    finally:
        for p in (proc, procs, two):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
    return r


def test_fsdp_mesh_trains_as_one_device(runs):
    err = runs.err4
    assert err.count("mesh: data=1 x fsdp=4 x tensor=1 over 4 devices") == 2
    assert err.count("gather their trained weights once") == 2
    assert "resumed from" in err and "at step 1" in err and "step 3/3" in err
    ref = [_params(runs.single, step) for step in (1, 2, 3)]
    assert _rel(ref[0], ref[1]) > 100 * TOL     # the second update moves the params far more than the tolerance
    for step in (1, 2, 3):                      # steps 2 and 3 after a restore into the sharded state
        assert _rel(_params(runs.four, step), ref[step - 1]) < TOL, step


def test_two_processes_train_as_one_device(runs):
    log = runs.log_multi
    assert log.count("mesh: data=1 x fsdp=2 x tensor=1 over 2 devices of 2 processes") == 2, log[-3000:]
    assert log.count("resumed from") == 1 and "step 3/3" in log      # process 0 logs, process 1 is quiet
    for step in (1, 2, 3):
        assert _rel(_params(runs.multi, step), _params(runs.single, step)) < TOL, step


def test_two_process_evaluation_holds_every_process_rows(runs):
    """The 2-process run's final evaluation: its grid holds every process's prompts (2 eval prompts per batch, one
    per process): both targets, in data order, and both generated images."""
    from PIL import Image
    assert "eval at step 3: dit/reward/total_mean=" in runs.log_multi, runs.log_multi[-3000:]
    grid = np.asarray(Image.open(runs.multi / "eval" / "step_3.png"))
    cell, pad = 128, 2                                    # 64x64 images upscaled x2; see monitor.image_grid
    assert grid.shape[1] == 2 * (cell + pad) + pad        # two columns: process 0's prompt and process 1's
    for i in range(2):
        x = pad + i * (cell + pad)
        target = np.asarray(Image.open(os.path.join(ROOT, "data", "t2i", "eval_target_images", f"{i}.png"))
                            .convert("RGB").resize((cell, cell), Image.NEAREST))
        np.testing.assert_array_equal(grid[pad:pad + cell, x:x + cell], target)
    images_row = grid[grid.shape[0] // 2:]                # the generated images, under the targets
    assert all(images_row[:, pad + i * (cell + pad):pad + i * (cell + pad) + cell].std() > 5 for i in range(2))


def test_mesh_errors_are_one_line():
    proc = _script(4, f"""
        for extra in (["--config.mesh.fsdp=3"], ["--config.mesh.data=1", "--config.mesh.fsdp=4",
                                                  "--config.train.groups_per_step=1"]):
            assert train.main(["--config", {SPEC!r}, "--workdir", "/nonexistent/never", *{ARGS!r}, *extra]) == 2
            print("---", file=sys.stderr)
    """)
    err = proc.communicate(timeout=300)[1]
    assert proc.returncode == 0, err[-3000:]
    fit, split = [e.strip() for e in err.split("---")[:2]]         # each call's whole stderr
    for e in (fit, split):
        assert e.startswith("error:") and "\n" not in e, e
    assert "config.mesh.fsdp=3: the mesh data=-1 x fsdp=3 x tensor=1 does not fit the 4 devices" in fit, fit
    assert "config.train.groups_per_step=1 x config.dit.group_size=2" in split and "data x fsdp = 4" in split, split


# ------------------------------------------------------------------------ the 4-device run on other meshes


def test_export_of_a_4_device_run_reads_only_the_params(runs, tmp_path):
    import jax
    import orbax.checkpoint as ocp

    from glm_jax import export
    from glm_jax.checkpoint import load_model
    from glm_jax.pipeline import GlmImageStack
    four = runs.four
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
    four = runs.four
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
    four, two, err2 = runs.four, runs.two, runs.err2
    assert "mesh: data=1 x fsdp=2 x tensor=1 over 2 devices" in err2
    assert "resumed from" in err2 and "at step 2" in err2 and "step 3/3" in err2
    a, b, before = _restore(four, 3), _restore(two, 3), _restore(four, 2)
    assert sorted(a) == sorted(b)
    assert _rel(_vec(_group(a, "dit.params.")), _vec(_group(before, "dit.params."))) > 1e-3   # step 3 moved them
    for group in ("dit.params.", "dit.opt_state.", "ema.dit."):
        assert _rel(_vec(_group(b, group)), _vec(_group(a, group))) < 1e-5, group
    assert b["step"] == a["step"] == 3
    np.testing.assert_array_equal(b["rng"], a["rng"])
