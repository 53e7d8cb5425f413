"""Multi-process runs: JAX's own multi-controller runtime, started from the environment.

    from glm_jax import distributed
    distributed.initialize()              # before any other jax call; a no-op for one process
    if distributed.is_main(): log(...)

`initialize` reads, in this order:

* `JAX_COORDINATOR_ADDRESS` (`host:port` of process 0), `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID` (and optionally
  `JAX_LOCAL_DEVICE_IDS`, e.g. `0` to give a process one GPU): what `python -m glm_jax.launch` sets, or set them
  yourself on every host;
* SLURM (`SLURM_JOB_ID`, `SLURM_STEP_NODELIST`, `SLURM_NTASKS` > 1, `SLURM_PROCID`, `SLURM_LOCALID`): JAX's
  cluster detection (coordinator = first node of the step, port derived from the job id, one local GPU per task
  when there is one task per GPU).

With neither (or one process) it does nothing. On CPU the cross-process collectives use gloo.

Every process runs the same program on the global mesh (`glm_jax.sharding.make_mesh` spans all devices of all
processes). Each process loads its own rows of the data (`process_rows`, then `sharding.host_to_global`),
host-side rewards such as OCR score the rows a process holds (`local_rows`, then `gather_rows`), and logs,
images and evaluation files come from process 0 (`is_main`). Orbax checkpoints are multi-process natively:
every process writes and reads its own shards.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "JAX_LOCAL_DEVICE_IDS"
_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


@dataclass(frozen=True)
class ClusterEnv:
    """The multi-process settings found in the environment (`source`: `"env"` or `"slurm"`)."""

    source: str
    num_processes: int
    process_id: int
    coordinator_address: str | None = None
    local_device_ids: tuple[int, ...] | None = None


def _int(environ: Mapping[str, str], name: str) -> int:
    try:
        return int(environ[name])
    except KeyError:
        raise ValueError(f"{name} is not set (needed with {ENV_NUM_PROCESSES} > 1)") from None
    except ValueError:
        raise ValueError(f"{name}={environ[name]!r}: expected an integer") from None


def cluster_env(environ: Mapping[str, str] | None = None) -> ClusterEnv | None:
    """The multi-process settings of this process from `environ` (default `os.environ`), or None for a single
    process. Raises ValueError naming the variable when the `JAX_*` settings are incomplete or inconsistent."""
    env = os.environ if environ is None else environ
    if ENV_NUM_PROCESSES in env or ENV_COORDINATOR in env:
        n = _int(env, ENV_NUM_PROCESSES)
        if n < 1:
            raise ValueError(f"{ENV_NUM_PROCESSES}={n}: expected a positive integer")
        if n == 1:
            return None
        pid = _int(env, ENV_PROCESS_ID)
        if not 0 <= pid < n:
            raise ValueError(f"{ENV_PROCESS_ID}={pid}: expected 0 <= id < {ENV_NUM_PROCESSES}={n}")
        addr = env.get(ENV_COORDINATOR)
        if not addr or ":" not in addr:
            raise ValueError(f"{ENV_COORDINATOR}={addr!r}: expected host:port of process 0")
        ids = env.get(ENV_LOCAL_DEVICE_IDS)
        local = tuple(int(i) for i in ids.split(",")) if ids else None
        return ClusterEnv("env", n, pid, addr, local)
    if all(v in env for v in _SLURM_VARS) and int(env["SLURM_NTASKS"]) > 1:
        return ClusterEnv("slurm", int(env["SLURM_NTASKS"]), int(env["SLURM_PROCID"]))
    return None


_STATE: dict[str, Any] = {"initialized": False}


def initialize(environ: Mapping[str, str] | None = None, *, timeout_s: int = 300) -> ClusterEnv | None:
    """Starts the multi-process runtime from the environment (see the module docstring); returns the settings,
    or None for a single process (nothing is done). Call it once, before any other jax call."""
    env = cluster_env(environ)
    if env is None or _STATE["initialized"]:
        return env
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if env.source == "slurm":
        jax.distributed.initialize(initialization_timeout=timeout_s)
    else:
        jax.distributed.initialize(coordinator_address=env.coordinator_address, num_processes=env.num_processes,
                                   process_id=env.process_id,
                                   local_device_ids=list(env.local_device_ids) if env.local_device_ids else None,
                                   initialization_timeout=timeout_s)
    _STATE["initialized"] = True
    return env


def shutdown() -> None:
    """Leaves the multi-process runtime (at the end of a run; optional)."""
    if _STATE["initialized"]:
        import jax
        jax.distributed.shutdown()
        _STATE["initialized"] = False


def process_index() -> int:
    import jax
    return jax.process_index()


def process_count() -> int:
    import jax
    return jax.process_count()


def is_main() -> bool:
    """True on process 0: the one that logs, writes images, evaluation grids and the resolved config."""
    return process_index() == 0


def process_rows(n_global: int) -> slice:
    """The rows `[start, stop)` of a global batch of `n_global` samples that this process loads (contiguous
    blocks in process order, which is how `sharding.host_to_global` assembles them)."""
    n, i = process_count(), process_index()
    if n_global % n:
        raise ValueError(f"a global batch of {n_global} samples does not split over {n} processes")
    k = n_global // n
    return slice(i * k, (i + 1) * k)


def _row_blocks(x) -> dict[tuple[int, int], Any]:
    """`{(start, stop): data}`: the blocks of rows of a global array (split on its first dimension, or
    replicated) held by this process's devices, each block once."""
    blocks: dict[tuple[int, int], Any] = {}
    for s in x.addressable_shards:
        start, stop, _ = s.index[0].indices(x.shape[0]) if s.index else (0, x.shape[0], 1)
        blocks.setdefault((start, stop), s.data)
    return blocks


def local_rows(x) -> tuple[slice, np.ndarray]:
    """`(rows, values)`: the rows of a global array sharded on its first dimension that this process holds, e.g.
    the images it scores with a host-side reward (OCR). A fully local array gives all rows."""
    shards = _row_blocks(x)
    spans = sorted(shards)
    for (_, b), (c, _) in itertools.pairwise(spans):
        if b != c:
            raise ValueError(f"this process holds non-contiguous rows {spans} of a [{x.shape[0]}, ...] array")
    return slice(spans[0][0], spans[-1][1]), np.concatenate([np.asarray(shards[k]) for k in spans], axis=0)


def gather_rows(local: Any) -> np.ndarray:
    """The rows computed by every process, concatenated in process order (all processes get the whole array);
    the inverse of `process_rows` / `local_rows` for host-side values such as rewards."""
    if process_count() == 1:
        return np.asarray(local)
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(np.asarray(local), tiled=True))


def own_rows(x, rows: slice) -> np.ndarray:
    """Rows `rows` of a global array `x` (sharded on its first dimension or replicated) as a host array on this
    process: read from the shards it holds when they cover `rows` (no communication), else gathered from the
    processes that hold them (every process must call it then, as for any collective)."""
    start, stop, _ = rows.indices(x.shape[0])
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)[start:stop]
    have = _row_blocks(x)
    parts, at = [], start
    for (a, b) in sorted(have):
        if a <= at < b:
            parts.append(np.asarray(have[(a, b)])[at - a:min(b, stop) - a])
            at = min(b, stop)
    covered = at >= stop
    # every process decides the same way (shardings are global), so the gather below is entered by all or none
    everywhere = bool(np.all(_gather_flags(covered)))
    if everywhere:
        return np.concatenate(parts, axis=0) if parts else np.asarray(have[next(iter(have))])[:0]
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))[start:stop]


def _gather_flags(flag: bool) -> np.ndarray:
    if process_count() == 1:
        return np.asarray([flag])
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(np.asarray([flag], np.int32), tiled=True)).astype(bool)


def any_process(flag: bool) -> bool:
    """True when `flag` is true on any process (a collective: every process calls it at the same point), e.g.
    a stop signal seen by one process, so that all stop after the same step."""
    return bool(np.any(_gather_flags(bool(flag))))


def sync(name: str) -> None:
    """A barrier across processes (e.g. before process 0 reads files the others wrote)."""
    if process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)
