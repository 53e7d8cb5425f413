"""The same training on different process layouts, and a checkpoint resumed on another one.

    python -m benchmarks.process_layouts --layouts 1x8,4x2 --resume 4x2:2x4 [-- <train args>]

Each layout `PxD` is `P` processes of `D` devices each: `python -m glm_jax.launch --nproc P --gpus-per-process D
-- <train args> --workdir W` (GPUs: the host's; CPU: `D` simulated devices per process through `XLA_FLAGS`).
`--resume A:B` trains with layout A up to `--stop-after steps-1` and finishes the run with layout B. Every run's
final trained params are compared with the first layout's (relative L2 norm over all parameters, restored on one
CPU device in this process), and its wall time and last logged images/s are reported. This is the multi-host
rehearsal of one 8-GPU host (4 processes x 2 GPUs stand for 4 hosts) and the check that a checkpoint moves between
process counts. Default train args: the tiny T2I DiT run with FSDP over every device (`configs/t2i.py:tiny,dit`,
2 steps, 4 prompts x 2 samples). Writes `$OUT/process_layouts.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_ARGS = ["--config", "configs/t2i.py:tiny,dit", "--config.train.steps=2", "--config.dit.num_steps=4",
                "--config.dit.group_size=2", "--config.train.groups_per_step=4", "--config.log.images_every=0",
                "--config.log.eval_every=0", "--config.checkpoint.every=1", "--config.mesh.data=1",
                "--config.mesh.fsdp=-1"]


def parse_layout(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)x(\d+)", text.strip())
    if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        raise argparse.ArgumentTypeError(f"layout {text!r}: expected PROCESSESxDEVICES, e.g. 4x2")
    return int(m.group(1)), int(m.group(2))


def have_gpus() -> bool:
    from glm_jax.launch import visible_gpus
    return bool(visible_gpus())


def launch(layout: tuple[int, int], train_args: list[str], workdir: str, log_path: str,
           stop_after: int | None = None) -> tuple[int, float]:
    """Runs the trainer on `layout`; returns (exit code, seconds)."""
    p, d = layout
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COORDINATOR", "JAX_NUM_PROCESSES",
                                                                    "JAX_PROCESS_ID"))}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    if not have_gpus():
        env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={d}")
    cmd = [sys.executable, "-m", "glm_jax.launch", "--nproc", str(p), "--gpus-per-process", str(d), "--",
           *train_args, "--workdir", workdir]
    if stop_after is not None:
        cmd += ["--stop-after", str(stop_after)]
    t0 = time.time()
    with open(log_path, "a") as log:
        code = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, check=False).returncode
    return code, time.time() - t0


def trained_params(workdir: str) -> np.ndarray:
    """The trained params of the newest checkpoint of `workdir`, flattened in path order, read as host arrays by
    the exporter (`glm_jax.export.run_params`) whatever mesh saved them."""
    from glm_jax.export import run_params
    _, parts = run_params(workdir)
    return np.concatenate([np.asarray(parts[p][k], np.float64).ravel() for p in sorted(parts)
                           for k in sorted(parts[p])])


def last_throughput(log_path: str) -> float | None:
    with open(log_path) as f:
        vals = re.findall(r"throughput/images_per_s=([0-9.e+-]+)", f.read())
    return float(vals[-1]) if vals else None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    train_args = DEFAULT_ARGS
    if "--" in argv:
        i = argv.index("--")
        argv, train_args = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(prog="python -m benchmarks.process_layouts", description=__doc__.split("\n\n")[0])
    ap.add_argument("--layouts", default="1x8,4x2", help="comma-separated PROCESSESxDEVICES")
    ap.add_argument("--resume", default="4x2:2x4", help="A:B: train on A, stop one step early, finish on B ('' = no)")
    ap.add_argument("--steps", type=int, default=2, help="the run's train.steps (for --resume's stop)")
    ap.add_argument("--keep", default="", help="keep the workdirs here (default: a temporary directory)")
    a = ap.parse_args(argv)
    import jax
    jax.config.update("jax_platforms", "cpu")          # this process only reads checkpoints
    layouts = [parse_layout(x) for x in a.layouts.split(",") if x.strip()]
    root = a.keep or tempfile.mkdtemp(prefix="process_layouts-")
    os.makedirs(root, exist_ok=True)
    res: dict = {"train_args": train_args, "gpus": have_gpus(), "date": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                                      time.gmtime()), "runs": []}
    ref = None
    try:
        runs = [(f"{p}x{d}", [((p, d), None)]) for p, d in layouts]
        if a.resume:
            first, second = (parse_layout(x) for x in a.resume.split(":"))
            runs.append((f"{a.resume} (resumed)", [(first, a.steps - 1), (second, None)]))
        for name, legs in runs:
            work = os.path.join(root, re.sub(r"[^0-9a-z]+", "_", name))
            log_path = work + ".log"
            seconds, code = 0.0, 0
            for layout, stop in legs:
                code, dt = launch(layout, train_args, work, log_path, stop)
                seconds += dt
                if code:
                    break
            row = {"layout": name, "exit_code": code, "seconds": round(seconds, 1), "log": log_path,
                   "images_per_s_last_step": last_throughput(log_path)}
            if code == 0:
                params = trained_params(work)
                if ref is None:
                    ref, row["reference"] = params, True
                else:
                    row["rel_diff_vs_first"] = float(np.linalg.norm(params - ref) / np.linalg.norm(ref))
            res["runs"].append(row)
            print(json.dumps(row), flush=True)
    finally:
        out = os.environ.get("OUT", "out")
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "process_layouts.json"), "w") as f:
            json.dump(res, f, indent=2)
        if not a.keep:
            shutil.rmtree(root, ignore_errors=True)
    return 0 if all(r["exit_code"] == 0 for r in res["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
