"""Training checkpoints: orbax `CheckpointManager` over the train state plus a JSON of host-side state.

    WORKDIR/checkpoints/<step>/state/     the train state pytree (trainable params, optimizer, EMA, step, RNG)
    WORKDIR/checkpoints/<step>/meta/      JSON: data-iterator position, wall time, config hash, ...

Saves are asynchronous (training continues while the previous save finishes) and atomic: orbax writes each step to
a temporary directory and renames it when complete, so an interrupted save never damages the last good checkpoint
(and an unfinished one is ignored at restore). `keep` limits how many are kept. `latest_step()` finds the newest
complete checkpoint; a rerun with the same workdir resumes from it. `StopSignal` turns SIGTERM / SIGINT into a flag
that the training loop polls, so it can save and exit cleanly.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

import jax
import orbax.checkpoint as ocp


class TrainCheckpointer:
    """Save every `every` steps (and on request), keep the last `keep`, restore the latest complete one."""

    def __init__(self, directory: str, *, every: int, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        self.every = max(int(every), 1)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self._mgr = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._mgr.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._mgr.all_steps())

    def should_save(self, step: int) -> bool:
        return step % self.every == 0

    def save(self, step: int, state: Any, meta: dict, *, force: bool = False) -> bool:
        """Starts an (async) save of `state` and `meta` at `step`; returns whether a save was started."""
        if not force and not self.should_save(step):
            return False
        if step in self._mgr.all_steps():
            return False
        return self._mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                            meta=ocp.args.JsonSave(meta)), force=True)

    def restore(self, target_state: Any, step: int | None = None) -> tuple[int, Any, dict]:
        """Restores `(step, state, meta)` from `step` (default: the latest complete checkpoint) into the structure,
        dtypes and shardings of `target_state` (arrays or `jax.ShapeDtypeStruct`s)."""
        step = self._mgr.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{self.directory}: no complete checkpoint to restore")
        abstract = jax.tree.map(_abstract, target_state)
        out = self._mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                             meta=ocp.args.JsonRestore()))
        return step, out["state"], dict(out["meta"])

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are on disk."""
        self._mgr.wait_until_finished()

    def close(self) -> None:
        self._mgr.wait_until_finished()
        self._mgr.close()


def _abstract(x):
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    if isinstance(x, jax.Array):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    return x


class StopSignal:
    """Catches SIGTERM / SIGINT (in the main thread) and sets a flag for the training loop to poll.

    A second SIGINT restores the default handler behaviour (immediate KeyboardInterrupt)."""

    def __init__(self):
        self._event = threading.Event()
        self.signal_name: str | None = None
        self._old = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self._event.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name
        self._event.set()

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    def restore_handlers(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}
