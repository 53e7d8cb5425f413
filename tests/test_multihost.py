"""Two processes on localhost (gloo CPU collectives, one CPU device each), started by `python -m glm_jax.launch`:
3 sharded DiT update steps with params and optimizer state split across the processes, each feeding its own
rows; an orbax checkpoint and a restore that resumes with the same next step; the same params as one process
on one device; and a sharded torch-directory load where each process reads only its half of every split
parameter. Plus the environment parsing of `glm_jax.distributed` and the launcher's fail-fast."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from glm_jax import distributed, launch
from glm_jax.grpo import train_step as T
from tests.util import CACHE_VARS, CPU_XLA_FLAGS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("JAX_", "SLURM_", "XLA_FLAGS")) or k in CACHE_VARS}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=CPU_XLA_FLAGS, PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""))
    return env


def test_two_processes_train_checkpoint_resume_and_load_their_slices(tmp_path):
    from glm_jax.tiny import tiny_dit_config
    from tests.test_sharding import DIT_SLOT, build, copy_tree, dit_case, flat_params, write_torch_dir
    hf = dict(tiny_dit_config(), num_layers=1)
    _, src = build(DIT_SLOT, 7)
    sd = write_torch_dir(str(tmp_path / "dit"), DIT_SLOT, src, hf, max_shard_size=1 << 30)
    out = tmp_path / "out"
    out.mkdir()
    cmd = [sys.executable, "-m", "glm_jax.launch", "--nproc", "2", "--module", "tests.multihost_worker", "--",
           "--out", str(out), "--torch-dir", str(tmp_path / "dit")]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    # meanwhile: the same 4 steps in this process on one device
    spec, ts0, batch, _ = dit_case()
    ts, losses = copy_tree(ts0), []
    for _ in range(4):
        ts, m = T.dit_update_jit(spec, ts, batch)
        losses.append(float(m["loss"]))
    want = [np.asarray(x) for x in jax.tree.leaves(ts.dit.params)]
    p0 = [np.asarray(x) for x in jax.tree.leaves(ts0.dit.params)]

    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log[-5000:]
    r = np.load(out / "result.npz")
    np.testing.assert_allclose(r["losses"], losses, rtol=1e-5, atol=1e-7)
    assert int(r["step_restored"]) == 3 and np.allclose(r["meta_losses"], losses[:3])
    assert float(r["loss_restored"]) == float(r["losses"][3])
    for i, (w, x0) in enumerate(zip(want, p0, strict=True)):
        assert np.array_equal(r[f"resumed_{i}"], r[f"live_{i}"])          # resume is exact
        upd = r[f"live_{i}"] - x0
        assert np.abs(upd - (w - x0)).max() <= 1e-4 * np.abs(w - x0).max() + 1e-9
    # sharded torch load: values, and each process read only its own slices
    want_loaded = flat_params(src)
    assert {k[len("loaded:"):] for k in r.files if k.startswith("loaded:")} == set(want_loaded)
    for k, v in want_loaded.items():
        np.testing.assert_array_equal(r[f"loaded:{k}"], np.asarray(v), err_msg=k)
    reads = [json.loads((out / f"reads_{i}.json").read_text()) for i in range(2)]
    total = sum(v.nbytes for v in sd.values())
    per_proc = [sum(n for _, _, n in rd) for rd in reads]
    assert all(n < total for n in per_proc) and sum(per_proc) > total      # split params halved, small ones whole
    k = "transformer_blocks.0.ff.net.0.proj.weight"      # (mlp 128, embed 32): embed split over the processes
    halves = [[(tuple(map(tuple, idx)), n) for key, idx, n in rd if key == k] for rd in reads]
    assert all(len(h) == 1 and h[0][1] * 2 == sd[k].nbytes for h in halves) and halves[0] != halves[1]


# ---------------------------------------------------------------------------------------- env and launcher


def test_cluster_env_from_jax_vars_and_slurm():
    assert distributed.cluster_env({}) is None
    assert distributed.cluster_env({"JAX_NUM_PROCESSES": "1"}) is None
    env = distributed.cluster_env({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4",
                                   "JAX_PROCESS_ID": "3", "JAX_LOCAL_DEVICE_IDS": "0,1"})
    assert env == distributed.ClusterEnv("env", 4, 3, "10.0.0.1:1234", (0, 1))
    with pytest.raises(ValueError, match="JAX_PROCESS_ID"):
        distributed.cluster_env({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"})
    with pytest.raises(ValueError, match="JAX_PROCESS_ID=2"):
        distributed.cluster_env({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"})
    with pytest.raises(ValueError, match="JAX_COORDINATOR_ADDRESS"):
        distributed.cluster_env({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"})
    slurm = {"SLURM_JOB_ID": "77", "SLURM_STEP_NODELIST": "gpu[01-02]", "SLURM_NTASKS": "16", "SLURM_PROCID": "9",
             "SLURM_LOCALID": "1"}
    assert distributed.cluster_env(slurm) == distributed.ClusterEnv("slurm", 16, 9)
    assert distributed.cluster_env(dict(slurm, SLURM_NTASKS="1")) is None
    assert distributed.process_rows(8) == slice(0, 8)


def test_launcher_env_gpus_and_fail_fast(tmp_path):
    env = launch.child_env({"A": "1"}, rank=1, nproc=2, coordinator="127.0.0.1:5", gpus=["4", "6"])
    assert env == {"A": "1", "JAX_COORDINATOR_ADDRESS": "127.0.0.1:5", "JAX_NUM_PROCESSES": "2",
                   "JAX_PROCESS_ID": "1", "CUDA_VISIBLE_DEVICES": "6"}
    assert launch.visible_gpus({"CUDA_VISIBLE_DEVICES": "2,3"}) == ["2", "3"]
    gpus = [str(g) for g in range(8)]              # 4 processes x 2 GPUs: process 2 gets GPUs 4 and 5
    env = launch.child_env({}, rank=2, nproc=4, coordinator="h:1", gpus=gpus, per_process=2)
    assert env["CUDA_VISIBLE_DEVICES"] == "4,5"
    with pytest.raises(ValueError, match="--nproc 3"):
        launch.run(["true"], 3, gpus=["0", "1"])
    with pytest.raises(ValueError, match="--gpus-per-process 2"):
        launch.run(["true"], 2, gpus=["0", "1", "2"], gpus_per_process=2)
    # process 1 fails at once, process 0 would sleep 60 s: the launcher stops it and returns 3
    script = "import os, sys, time; pid = int(os.environ['JAX_PROCESS_ID']); time.sleep(60) if pid == 0 else sys.exit(3)"
    t = time.monotonic()
    code = launch.run([sys.executable, "-c", script], 2, gpus=[], grace=5.0)
    assert code == 3 and time.monotonic() - t < 20
    assert launch.main(["--nproc", "2", "--no-python", "--", sys.executable, "-c",
                        "import os; assert os.environ['JAX_NUM_PROCESSES'] == '2'"]) == 0
    # without --no-python each process runs `python -m glm_jax.train` with the arguments after --
    assert launch.main(["--nproc", "2", "--", "--help"]) == 0


def test_launcher_forwards_sigterm_to_every_process(tmp_path):
    """SIGTERM to the launcher reaches both processes, which exit cleanly (as the trainer does after saving)."""
    script = ("import os, signal, sys, time, pathlib; d = pathlib.Path(sys.argv[1]); i = os.environ['JAX_PROCESS_ID']\n"
              "signal.signal(signal.SIGTERM, lambda *a: ((d / f'term{i}').write_text('x'), sys.exit(0)))\n"
              "(d / f'ready{i}').write_text('x')\n"
              "time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-m", "glm_jax.launch", "--nproc", "2", "--no-python", "--",
                             sys.executable, "-c", script, str(tmp_path)], cwd=ROOT, env=_env())
    deadline = time.monotonic() + 30
    while not all((tmp_path / f"ready{i}").exists() for i in range(2)) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    assert all((tmp_path / f"term{i}").exists() for i in range(2))
