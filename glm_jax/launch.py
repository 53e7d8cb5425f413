"""One host, several processes: `python -m glm_jax.launch --nproc N -- <train args>`.

    python -m glm_jax.launch --nproc 2 -- --config configs/t2i.py --workdir runs/x --config.mesh.fsdp=2

starts N copies of `python -m glm_jax.train <train args>` (`--module` picks another module; `--no-python` runs
the arguments after `--` as a command of their own) with the environment `glm_jax.distributed.initialize`
reads: `JAX_COORDINATOR_ADDRESS=127.0.0.1:<free port>`, `JAX_NUM_PROCESSES=N`, `JAX_PROCESS_ID=i`, and, when
the host has GPUs, `CUDA_VISIBLE_DEVICES` = the i-th visible GPU (one GPU per process; `--gpus-per-process K`
gives process i the GPUs i*K .. i*K+K-1, e.g. 4 processes x 2 GPUs on one 8-GPU host to rehearse 4 hosts). SIGINT / SIGTERM are
forwarded to every process (the trainer saves a checkpoint and exits); when one process fails, the others are
stopped (SIGTERM, then SIGKILL after `--grace` seconds) and its exit code is returned. Without `--`, the
arguments go to the module as well.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on `host` now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def visible_gpus(environ=None) -> list[str]:
    """The GPUs a process may use: `CUDA_VISIBLE_DEVICES` when set, else those `nvidia-smi -L` lists."""
    env = os.environ if environ is None else environ
    if "CUDA_VISIBLE_DEVICES" in env:
        return [g for g in env["CUDA_VISIBLE_DEVICES"].split(",") if g.strip() not in ("", "-1")]
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [str(i) for i, line in enumerate(out.splitlines()) if line.startswith("GPU ")]


def child_env(base, *, rank: int, nproc: int, coordinator: str, gpus: list[str], per_process: int = 1
              ) -> dict[str, str]:
    """The environment of process `rank`: the `JAX_*` multi-process variables and its GPUs, if any (the
    `per_process` consecutive GPUs `rank * per_process ...`)."""
    env = dict(base)
    env.update(JAX_COORDINATOR_ADDRESS=coordinator, JAX_NUM_PROCESSES=str(nproc), JAX_PROCESS_ID=str(rank))
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus[rank * per_process:(rank + 1) * per_process])
    return env


def _stop(procs: list[subprocess.Popen], grace: float) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in procs:
        while p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if p.poll() is None:
            p.kill()
            p.wait()


def run(cmd: list[str], nproc: int, *, host: str = "127.0.0.1", port: int = 0, grace: float = 30.0,
        gpus: list[str] | None = None, environ=None, gpus_per_process: int = 1) -> int:
    """Runs `nproc` copies of `cmd` as one multi-process job, each with `gpus_per_process` GPUs (when the host
    has GPUs); returns 0 when all succeed, else the exit code of the first process that failed (the others are
    stopped)."""
    gpus = visible_gpus(environ) if gpus is None else gpus
    if gpus_per_process < 1:
        raise ValueError(f"--gpus-per-process {gpus_per_process}: must be >= 1")
    if gpus and len(gpus) < nproc * gpus_per_process:
        raise ValueError(f"--nproc {nproc} x --gpus-per-process {gpus_per_process}: only {len(gpus)} GPU(s) "
                         f"visible ({','.join(gpus)})")
    coordinator = f"{host}:{port or free_port(host)}"
    base = os.environ if environ is None else environ
    procs = [subprocess.Popen(cmd, env=child_env(base, rank=r, nproc=nproc, coordinator=coordinator, gpus=gpus,
                                                 per_process=gpus_per_process))
             for r in range(nproc)]

    def forward(signum, frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                rank, code = failed[0]
                print(f"glm_jax.launch: process {rank} exited with code {code}; stopping the others",
                      file=sys.stderr)
                _stop(procs, grace)
                return code if code > 0 else 128 - code
            if all(c == 0 for c in codes):
                return 0
            time.sleep(0.1)
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    rest: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, rest = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(prog="python -m glm_jax.launch", description=__doc__.split("\n\n")[0])
    ap.add_argument("--nproc", type=int, required=True, help="number of processes (one per GPU on a GPU host)")
    ap.add_argument("--gpus-per-process", type=int, default=1,
                    help="GPUs of each process (e.g. 4 processes x 2 GPUs on an 8-GPU host)")
    ap.add_argument("--module", default="glm_jax.train", help="python module each process runs")
    ap.add_argument("--no-python", action="store_true", help="run the arguments after -- as the command")
    ap.add_argument("--host", default="127.0.0.1", help="coordinator address (process 0 listens there)")
    ap.add_argument("--port", type=int, default=0, help="coordinator port (0: a free one)")
    ap.add_argument("--grace", type=float, default=30.0, help="seconds between SIGTERM and SIGKILL on failure")
    args, extra = ap.parse_known_args(argv)
    rest = extra + rest
    if args.nproc < 1:
        ap.error("--nproc must be >= 1")
    if args.no_python and not rest:
        ap.error("--no-python needs a command after --")
    cmd = rest if args.no_python else [sys.executable, "-m", args.module, *rest]
    try:
        return run(cmd, args.nproc, host=args.host, port=args.port, grace=args.grace,
                   gpus_per_process=args.gpus_per_process)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
