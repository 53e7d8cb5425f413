"""Export a glm_jax checkpoint back to the PyTorch layout (HF / diffusers directories of safetensors).

    python -m conversion.to_torch --src CKPT --dst DIR [--max-shard-size 5GB] [--overwrite]

A checkpoint converted from a pipeline is written back as the full pipeline directory (`model_index.json`, every
component, and the processor / tokenizer / scheduler files), loadable with `GlmImagePipeline.from_pretrained(DIR)`;
a single-component checkpoint is written as that component's directory (e.g. loadable with
`GlmImageForConditionalGeneration.from_pretrained(DIR)`). Dtypes are kept; weights are written one tensor at a time.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys

import numpy as np

from conversion.apply import ConversionError
from conversion.safetensors_io import PendingTensor, write_sharded
from conversion.table import find_jax, jax_to_torch_array, torch_shape_for
from glm_jax.checkpoint import load_params, publish_dir, read_manifest
from glm_jax.components import COMPONENTS, FILE_SLOTS


def parse_size(text: str) -> int:
    """'5GB', '500MB', '10KB' or a byte count -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"--max-shard-size: cannot parse {text!r} (use e.g. 5GB or 500MB)")
    mult = {None: 1, "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30}
    return int(float(m.group(1)) * mult[m.group(2).lower() if m.group(2) else None])


def export_component(ckpt: str, slot: str, out_dir: str, max_shard_size: int,
                     params: dict[str, np.ndarray] | None = None) -> list[str]:
    """Writes one component (config files + safetensors) into `out_dir`. `params` overrides the stored params
    (e.g. merged LoRA weights); otherwise they are read from the checkpoint."""
    spec = COMPONENTS[slot]
    src = os.path.join(ckpt, slot)
    if params is None:
        params = load_params(os.path.join(src, "params"))
    rules = spec.rules()
    pending = []
    for path in sorted(params):
        hit = find_jax(rules, path)
        if hit is None:
            raise ConversionError(f"{src}: parameter {path!r} has no rule in the {slot} key table")
        key, rule = hit
        arr = params[path]
        shape = torch_shape_for(tuple(arr.shape), rule.transform)
        pending.append(PendingTensor(key, shape, np.dtype(arr.dtype),
                                     lambda a=arr, t=rule.transform: jax_to_torch_array(np.asarray(a), t)))
    pending.sort(key=lambda t: t.name)
    os.makedirs(out_dir, exist_ok=True)
    for name in sorted(os.listdir(src)):
        if name.endswith(".json"):
            shutil.copy2(os.path.join(src, name), os.path.join(out_dir, name))
    return write_sharded(out_dir, spec.weights_stem, pending, max_shard_size)


def export(ckpt: str, dst: str, *, max_shard_size: int = 5 * 10 ** 9, overwrite: bool = False,
           params_override: dict[str, dict[str, np.ndarray]] | None = None) -> None:
    """Writes the PyTorch layout of checkpoint `ckpt` into `dst` (via a temporary directory and a rename)."""
    ckpt, dst = os.path.abspath(ckpt), os.path.abspath(dst)
    manifest = read_manifest(ckpt)
    if os.path.exists(dst) and os.listdir(dst) and not overwrite:
        raise ConversionError(f"{dst}: destination exists and is not empty (pass --overwrite to replace it)")
    tmp = f"{dst}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    params_override = params_override or {}
    try:
        slots = list(manifest["components"])
        if manifest.get("source_layout") == "pipeline":
            for slot in slots:
                export_component(ckpt, slot, os.path.join(tmp, slot), max_shard_size, params_override.get(slot))
            for slot in FILE_SLOTS:
                if os.path.isdir(os.path.join(ckpt, slot)):
                    shutil.copytree(os.path.join(ckpt, slot), os.path.join(tmp, slot))
            shutil.copy2(os.path.join(ckpt, "model_index.json"), os.path.join(tmp, "model_index.json"))
        else:
            if len(slots) != 1:
                raise ConversionError(f"{ckpt}: a component checkpoint must hold exactly one component")
            export_component(ckpt, slots[0], tmp, max_shard_size, params_override.get(slots[0]))
        publish_dir(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m conversion.to_torch", description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", required=True, help="glm_jax checkpoint directory")
    ap.add_argument("--dst", required=True, help="directory to write the PyTorch layout into")
    ap.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    ap.add_argument("--overwrite", action="store_true", help="replace --dst if it exists")
    args = ap.parse_args(argv)
    try:
        export(args.src, args.dst, max_shard_size=parse_size(args.max_shard_size), overwrite=args.overwrite)
    except (ConversionError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
