"""Export a glm_jax checkpoint back to the PyTorch layout (HF / diffusers directories of safetensors).

    python -m conversion.to_torch --src CKPT --dst DIR [--max-shard-size 5GB] [--overwrite] [--lora separate]

A checkpoint converted from a pipeline is written back as the full pipeline directory (`model_index.json`, every
component, and the processor / tokenizer / scheduler files), loadable with `GlmImagePipeline.from_pretrained(DIR)`;
a single-component checkpoint is written as that component's directory (e.g. loadable with
`GlmImageForConditionalGeneration.from_pretrained(DIR)`). Dtypes are kept; weights are written one tensor at a time.

LoRA adapters stored with a component (manifest entry `lora.<slot>`, see `glm_jax.lora`) are merged into the
weights by default (`W + alpha / rank * B A`, computed in float32, written in W's dtype). `--lora separate` writes
the base weights unchanged and the adapters as a PEFT-format directory `DIR/<slot>_lora/`:
`adapter_model.safetensors` with `<torch module>.lora_A.weight` `(rank, in)` and `.lora_B.weight` `(out, rank)`,
and `adapter_config.json` (`r`, `lora_alpha`, `target_modules` = the full torch module names).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import sys
import time

import numpy as np

from conversion.apply import ConversionError, progress_bar
from conversion.safetensors_io import PendingTensor, write_sharded
from conversion.table import LINEAR, find_jax, jax_to_torch_array, torch_shape_for
from glm_jax.checkpoint import load_params, publish_dir, read_manifest
from glm_jax.components import COMPONENTS, FILE_SLOTS
from glm_jax.lora import LoraConfig, adapter_pairs, is_adapter_key, merge_flat, read_checkpoint_lora

LORA_MODES = ("merge", "separate")


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
    bar = progress_bar(sum(t.nbytes for t in pending), slot, unit="B", unit_scale=True)
    if bar is not None:
        def counted(t: PendingTensor) -> PendingTensor:
            def produce():
                arr = t.produce()
                bar.update(t.nbytes)
                return arr
            return dataclasses.replace(t, produce=produce)
        pending = [counted(t) for t in pending]
    try:
        return write_sharded(out_dir, spec.weights_stem, pending, max_shard_size)
    finally:
        if bar is not None:
            bar.close()


def lora_params(ckpt: str, slot: str, manifest: dict, params: dict[str, np.ndarray] | None
                ) -> tuple[dict[str, np.ndarray], LoraConfig | None]:
    """The flat params of `slot` (the checkpoint's, or `params` when given) and their LoRA config (None without
    adapters); checks adapter keys against the manifest entry `lora.<slot>`."""
    where = os.path.join(ckpt, slot, "params")
    if params is None:
        params = load_params(where)
    elif not any(is_adapter_key(k) for k in params):
        return params, None
    shapes = {k: tuple(np.shape(v)) for k, v in params.items()}
    return params, read_checkpoint_lora(manifest, slot, shapes, where)


def write_peft_adapter(out_dir: str, slot: str, params: dict[str, np.ndarray], lora: LoraConfig) -> list[str]:
    """Writes the adapters among flat `params` as a PEFT-format directory: `adapter_model.safetensors`
    (`<torch module>.lora_A.weight` `(rank, in)`, `.lora_B.weight` `(out, rank)`) and `adapter_config.json`."""
    rules = COMPONENTS[slot].rules()
    pending, modules = [], []
    for base, (ka, kb) in sorted(adapter_pairs(params).items()):
        hit = find_jax(rules, base + ".kernel")
        if hit is None or hit[1].transform != LINEAR:
            raise ConversionError(f"{slot}: LoRA key {ka!r} adapts {base + '.kernel'!r}, which has no linear rule "
                                  f"in the {slot} key table")
        module = hit[0].removesuffix(".weight")
        modules.append(module)
        for key, arr in ((f"{module}.lora_A.weight", params[ka]), (f"{module}.lora_B.weight", params[kb])):
            arr = np.asarray(arr)
            pending.append(PendingTensor(key, (arr.shape[1], arr.shape[0]), np.dtype(arr.dtype),
                                         lambda a=arr: np.ascontiguousarray(a.T)))
    os.makedirs(out_dir, exist_ok=True)
    files = write_sharded(out_dir, "adapter_model", pending, 1 << 62)
    config = {"peft_type": "LORA", "r": int(lora.rank), "lora_alpha": float(lora.alpha),
              "target_modules": modules, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
              "use_rslora": False, "init_lora_weights": True, "inference_mode": True, "task_type": None,
              "base_model_name_or_path": None, "glm_jax_targets": list(lora.targets)}
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return files


def export_slot(ckpt: str, slot: str, manifest: dict, out_dir: str, lora_dir: str, max_shard_size: int,
                params: dict[str, np.ndarray] | None, lora: str, log=lambda _msg: None) -> None:
    """One component: weights into `out_dir`, with its LoRA adapters merged or (`lora="separate"`) written to
    `lora_dir` in PEFT format; `log` gets a line when it is written."""
    t0 = time.time()
    params, lora_cfg = lora_params(ckpt, slot, manifest, params)
    if lora_cfg is not None:
        if lora == "merge":
            params = merge_flat(params, lora_cfg.rank, lora_cfg.alpha)
        else:
            write_peft_adapter(lora_dir, slot, params, lora_cfg)
            params = {k: v for k, v in params.items() if not is_adapter_key(k)}
    export_component(ckpt, slot, out_dir, max_shard_size, params)
    log(f"exported {slot} in {time.time() - t0:.1f}s")


def export(ckpt: str, dst: str, *, max_shard_size: int = 5 * 10 ** 9, overwrite: bool = False,
           params_override: dict[str, dict[str, np.ndarray]] | None = None, lora: str = "merge",
           log=lambda _msg: None) -> None:
    """Writes the PyTorch layout of checkpoint `ckpt` into `dst` (via a temporary directory and a rename).

    `lora`: "merge" folds stored LoRA adapters into the weights; "separate" writes the base weights and each
    adapted component's adapters to `dst/<slot>_lora/` (PEFT format). `log` gets a line per component written
    (the CLI prints them; a byte progress bar runs on a terminal)."""
    if lora not in LORA_MODES:
        raise ConversionError(f"--lora {lora!r}: expected one of {', '.join(LORA_MODES)}")
    try:
        manifest = read_manifest(ckpt)
    except ValueError as e:
        raise ConversionError(f"--src {e}") from None
    ckpt, dst = os.path.abspath(ckpt), os.path.abspath(dst)
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
                export_slot(ckpt, slot, manifest, os.path.join(tmp, slot), os.path.join(tmp, f"{slot}_lora"),
                            max_shard_size, params_override.get(slot), lora, log)
            for slot in FILE_SLOTS:
                if os.path.isdir(os.path.join(ckpt, slot)):
                    shutil.copytree(os.path.join(ckpt, slot), os.path.join(tmp, slot))
            shutil.copy2(os.path.join(ckpt, "model_index.json"), os.path.join(tmp, "model_index.json"))
        else:
            if len(slots) != 1:
                raise ConversionError(f"{ckpt}: a component checkpoint must hold exactly one component")
            export_slot(ckpt, slots[0], manifest, tmp, os.path.join(tmp, f"{slots[0]}_lora"), max_shard_size,
                        params_override.get(slots[0]), lora, log)
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
    ap.add_argument("--lora", choices=LORA_MODES, default="merge",
                    help="LoRA adapters in the checkpoint: merge them into the weights (default), or write the base "
                         "weights plus a PEFT adapter directory <slot>_lora/ (separate)")
    args = ap.parse_args(argv)
    try:
        export(args.src, args.dst, max_shard_size=parse_size(args.max_shard_size), overwrite=args.overwrite,
               lora=args.lora, log=lambda msg: print(msg, flush=True))
    except (ConversionError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
