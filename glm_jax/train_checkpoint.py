"""Training checkpoints: orbax `CheckpointManager` over the train state plus a JSON of host-side state.

    WORKDIR/checkpoints/<step>/state/     the train state pytree (trainable params, optimizer, EMA, step, RNG)
    WORKDIR/checkpoints/<step>/meta/      JSON: data-iterator position, wall time, the resolved config

Saves are asynchronous (training continues while the previous save finishes) and atomic: orbax writes each step to
a temporary directory and renames it when complete, so an interrupted save never damages the last good checkpoint
(and an unfinished one is ignored at restore). `keep` limits how many are kept. `latest_step()` finds the newest
complete checkpoint; a rerun with the same workdir resumes from it. A checkpoint whose arrays differ from the state
the current config builds (other trained parameters, LoRA rank, EMA on / off, ...) is a `CheckpointMismatch` naming
the arrays, raised before anything is read. `StopSignal` turns SIGTERM / SIGINT into a flag
that the training loop polls, so it can save and exit cleanly.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointMismatch(ValueError):
    """The saved train state has other arrays (paths or shapes) than the one to restore into."""


def _dotted(path) -> str:
    parts = []
    for k in path:
        for attr in ("key", "idx", "name"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return ".".join(parts)


def _shapes(tree) -> dict[str, tuple]:
    return {_dotted(p): tuple(getattr(x, "shape", ())) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def describe_mismatch(saved: dict[str, tuple], wanted: dict[str, tuple], most: int = 2) -> str | None:
    """One line on how the saved arrays (`path -> shape`) differ from the wanted ones; None if they agree."""
    order = lambda k: ("opt_state" in k, k)    # examples: parameters before optimizer moments
    only_saved = sorted(set(saved) - set(wanted), key=order)
    only_wanted = sorted(set(wanted) - set(saved), key=order)
    reshaped = sorted((k for k in set(saved) & set(wanted) if saved[k] != wanted[k]), key=order)
    out = []
    if only_saved:
        out.append(f"{len(only_saved)} saved arrays this config does not train (e.g. {', '.join(only_saved[:most])})")
    if only_wanted:
        out.append(f"{len(only_wanted)} arrays of this config not in the checkpoint "
                   f"(e.g. {', '.join(only_wanted[:most])})")
    if reshaped:
        out.append(f"{len(reshaped)} arrays of another shape (e.g. " +
                   ", ".join(f"{k}: saved {saved[k]}, now {wanted[k]}" for k in reshaped[:most]) + ")")
    return "; ".join(out) or None


class TrainCheckpointer:
    """Save every `every` steps (and on request), keep the last `keep`, restore the latest complete one."""

    def __init__(self, directory: str, *, every: int, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        self.every = max(int(every), 1)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self._mgr = ocp.CheckpointManager(self.directory, options=options, item_handlers={
            "state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})

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
        saved = self._mgr.item_metadata(step)["state"]
        why = describe_mismatch(_shapes(saved), _shapes(abstract))
        if why is not None:
            raise CheckpointMismatch(f"{self.directory}/{step}: the saved train state differs from the one this "
                                     f"config builds: {why}")
        out = self._mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                             meta=ocp.args.JsonRestore()))
        return step, out["state"], dict(out["meta"])

    def read_meta(self, step: int | None = None) -> dict:
        """The JSON saved with `step` (default: the latest complete checkpoint), without reading the state."""
        step = self._mgr.latest_step() if step is None else step
        return dict(self._mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])

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
