"""Export a training run as a glm_jax checkpoint directory (then `python -m conversion.to_torch` for PyTorch).

    python -m glm_jax.export --workdir runs/tiny --out ckpt/tiny-trained [--step N] [--ema] [--overwrite]
    python -m conversion.to_torch --src ckpt/tiny-trained --dst hf/tiny-trained

The output has the layout of `glm_jax.checkpoint` (what `python -m conversion.from_torch` writes): the base
checkpoint of the run (`model.ckpt` of the run's `config.json`, or the embedded tiny checkpoint `glm_jax.tiny` when
it is empty) with every component, processor, scheduler and tokenizer file, and the trained components' parameters
replaced by those of the run's checkpoint at `--step` (default: the newest complete one):

* full fine-tuning: the trained parameters (cast to the base checkpoint's dtype of each parameter) replace the
  base ones; the rest of the component (e.g. the AR's vision tower) is the base's;
* LoRA: the base parameters are kept and the adapters are added as `<dense path>.lora_a` / `.lora_b` keys, with the
  manifest entry `"lora": {"<slot>": {"rank", "alpha", "targets"}}`; `checkpoint.load_model` merges them when it
  loads the component (so `python -m glm_jax.generate --ckpt OUT` uses the fine-tuned model unchanged) and
  `conversion.to_torch` merges them on export (or writes them separately in PEFT format with `--lora separate`).

`--ema` exports the run's EMA parameters instead of the trained ones (the run needs `ema.decay > 0`). The directory
is written to a temporary sibling and renamed into place when complete (`checkpoint.publish_dir`); unchanged base
files are hard-linked when the file system allows it, copied otherwise. The manifest records the run, step and
whether the EMA was exported under `"trained"`.

A run's checkpoint exports on any machine, whatever mesh saved it (e.g. a run on `mesh.fsdp=8` exports in a process
with one CPU device): only the exported arrays are read from it (the trained params, or the EMA with `--ema`; never
the optimizer moments, which hold twice the params' bytes), straight into host memory as numpy arrays in their saved
dtypes, without device memory and without the shardings recorded in the checkpoint (`read_state`). Host memory holds
the exported arrays and the base component's parameters they replace.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

import numpy as np

SLOTS = {"ar": "vision_language_encoder", "dit": "transformer"}


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def read_run_config(workdir: str):
    """The resolved config (`config.json`) of a training run as a `ConfigDict`."""
    from ml_collections import ConfigDict
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"--workdir {workdir}: no config.json (not a glm_jax.train workdir)")
    with open(path) as f:
        return ConfigDict(json.load(f))


def base_checkpoint(cfg) -> str:
    """The checkpoint a run started from: `model.ckpt`, or the embedded tiny checkpoint of the run's seed."""
    if cfg.model.ckpt:
        return cfg.model.ckpt
    from glm_jax.tiny import tiny_checkpoint
    return tiny_checkpoint(seed=int(cfg.seed))


def _flat(tree, prefix: str = "") -> dict[str, np.ndarray]:
    """Nested restored dicts -> `{nnx path: array}` (the `.value` level of saved `nnx.Variable`s dropped)."""
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = np.asarray(v)
    return {(k.removesuffix(".value")): v for k, v in out.items()}


def _subtree(tree: dict, keys: tuple[str, ...]):
    """`tree[keys[0]][keys[1]]...`."""
    for k in keys:
        tree = tree[k]
    return tree


def _item_metadata(path: str):
    """The saved tree of the orbax item at `path` (a step's `state/`). Orbax logs a warning that the step-level
    `_CHECKPOINT_METADATA` file is not in the item's directory, where it never is; that message is dropped."""
    import logging

    import orbax.checkpoint as ocp

    class _DropStepMetadataWarning(logging.Filter):
        def filter(self, record):
            return "_CHECKPOINT_METADATA" not in record.getMessage()

    drop, absl_log = _DropStepMetadataWarning(), logging.getLogger("absl")
    absl_log.addFilter(drop)
    try:
        meta = ocp.StandardCheckpointer().metadata(path).item_metadata
    finally:
        absl_log.removeFilter(drop)
    return getattr(meta, "tree", meta)


def read_state(path: str, subtrees: list[tuple[str, ...]]) -> dict:
    """The subtrees at the key paths `subtrees` of the orbax pytree checkpoint at `path`, as nested dicts of host
    `np.ndarray`s in their saved dtypes; nothing else of the checkpoint is read.

    The saved tree comes from the checkpoint's metadata, every array leaf is restored with `restore_type=np.ndarray`
    (no device memory, no use of the shardings or the device topology the checkpoint was saved with) and the
    restore is partial: the arrays outside `subtrees` (e.g. optimizer moments) are neither read nor decoded."""
    import jax
    import orbax.checkpoint as ocp
    tree = _item_metadata(path)
    item: dict = {}
    for keys in subtrees:
        dst = item
        for k in keys[:-1]:
            dst = dst.setdefault(k, {})
        dst[keys[-1]] = _subtree(tree, keys)
    restore_args = jax.tree.map(
        lambda m: ocp.RestoreArgs(restore_type=np.ndarray) if hasattr(m, "shape") else ocp.RestoreArgs(), item)
    return ocp.PyTreeCheckpointer().restore(
        path, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True))


def state_path(workdir: str, step: int | None = None) -> tuple[int, str]:
    """`(step, path)` of the saved train state of run `workdir` at `step` (default: the newest complete one)."""
    directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    steps = sorted(int(d) for d in os.listdir(directory) if d.isdigit()) if os.path.isdir(directory) else []
    if not steps:
        raise ValueError(f"--workdir {workdir}: no checkpoint in {directory}")
    if step is None:
        step = steps[-1]
    if step not in steps:
        raise ValueError(f"--step {step}: no checkpoint of that step in {directory} (have {steps})")
    return step, os.path.join(directory, str(step), "state")


def run_params(workdir: str, step: int | None = None, *, ema: bool = False) -> tuple[int, dict[str, dict]]:
    """`(step, {part: {nnx path: np.ndarray}})`: the trained params (or the EMA) of a run's checkpoint at `step`
    (default: the newest complete one), read to host memory in their saved dtypes whatever mesh saved them (see
    `read_state`; the optimizer state and, without `ema`, the EMA are not read)."""
    step, path = state_path(workdir, step)
    saved = _item_metadata(path)
    parts = [p for p in SLOTS if p in saved]
    if ema:
        if "ema" not in saved:
            raise ValueError(f"--ema: the run in {workdir} keeps no EMA (ema.decay was 0)")
        parts = [p for p in parts if p in saved["ema"]]
        tree = read_state(path, [("ema", p) for p in parts])
        return step, {p: _flat(tree["ema"][p]) for p in parts}
    tree = read_state(path, [(p, "params") for p in parts])
    return step, {p: _flat(tree[p]["params"]) for p in parts}


def export(workdir: str, out: str, *, step: int | None = None, ema: bool = False, overwrite: bool = False,
           log=print) -> str:
    """Writes the glm_jax checkpoint of run `workdir` (see the module docstring) to `out`; returns `out`."""
    from glm_jax.checkpoint import MANIFEST, load_params, publish_dir, read_manifest, save_params
    cfg = read_run_config(workdir)
    base = base_checkpoint(cfg)
    out = os.path.abspath(out)
    if os.path.exists(out) and os.listdir(out) and not overwrite:
        raise ValueError(f"--out {out}: exists and is not empty (pass --overwrite to replace it)")
    step, trained = run_params(workdir, step, ema=ema)
    manifest = read_manifest(base)
    lora = None
    if cfg.lora.enabled:
        from glm_jax.lora import LoraConfig
        lora = LoraConfig.from_config(cfg.lora)
    tmp = f"{out}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    replaced = {SLOTS[p] for p in trained}
    try:
        def ignore(directory, names):
            rel = os.path.relpath(directory, base)
            return ["params"] if rel in replaced else []
        shutil.copytree(base, tmp, ignore=ignore, copy_function=_link_or_copy)
        for part, params in trained.items():
            slot = SLOTS[part]
            if slot not in manifest.get("components", {}):
                raise ValueError(f"{base}: the base checkpoint has no {slot!r} component to replace")
            flat = load_params(os.path.join(base, slot, "params"))
            if lora is not None:
                from glm_jax.lora import is_adapter_key
                for k, v in params.items():
                    if not is_adapter_key(k):
                        raise ValueError(f"{workdir}: LoRA run checkpoint holds a non-adapter parameter {k!r}")
                    if k[: -len(".lora_a")] + ".kernel" not in flat:
                        raise ValueError(f"{workdir}: adapter {k!r} has no kernel in {base}/{slot}")
                    flat[k] = v
                manifest.setdefault("lora", {})[slot] = lora.to_manifest()
            else:
                for k, v in params.items():
                    if k not in flat:
                        raise ValueError(f"{workdir}: trained parameter {k!r} is not in {base}/{slot}")
                    if tuple(flat[k].shape) != tuple(v.shape):
                        raise ValueError(f"{workdir}: trained parameter {k!r} has shape {v.shape}, the base "
                                         f"{tuple(flat[k].shape)}")
                    flat[k] = v.astype(np.asarray(flat[k]).dtype)
            save_params(os.path.join(tmp, slot, "params"), {k: np.asarray(v) for k, v in flat.items()})
            log(f"{slot}: {len(params)} {'adapter' if lora is not None else 'trained'} arrays from step {step}"
                + (" (EMA)" if ema else ""))
        manifest["trained"] = {"workdir": os.path.abspath(workdir), "step": int(step), "ema": bool(ema),
                               "components": sorted(replaced), "lora": lora is not None}
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=2)
        publish_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m glm_jax.export", description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", required=True, help="the training run's workdir")
    ap.add_argument("--out", required=True, help="the glm_jax checkpoint directory to write")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    ap.add_argument("--ema", action="store_true", help="export the EMA parameters (runs with ema.decay > 0)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = ap.parse_args(argv)
    try:
        out = export(args.workdir, args.out, step=args.step, ema=args.ema, overwrite=args.overwrite,
                     log=lambda m: print(m, file=sys.stderr))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(f"wrote {out}; PyTorch weights: python -m conversion.to_torch --src {out} --dst <dir>")
    return 0


if __name__ == "__main__":
    sys.exit(main())
