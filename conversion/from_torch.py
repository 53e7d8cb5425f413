"""Convert a PyTorch GLM-Image directory (HF / diffusers layout, safetensors) into a glm_jax checkpoint.

    python -m conversion.from_torch --src DIR --dst DIR [--overwrite]

`--src` is a full `GlmImagePipeline` directory (`model_index.json` with `vision_language_encoder/`, `transformer/`,
`vae/`, `text_encoder/`, `processor/`, `tokenizer/`, `scheduler/`) or one component directory (its `config.json`
says which). Tensors are streamed one at a time from memory-mapped safetensors; peak host memory is about the
converted parameters plus the largest tensor. torch is never imported. The output is written to a temporary
directory next to `--dst` and renamed at the end, so a failed conversion leaves no half-written `--dst`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

from conversion.apply import ConversionError, convert_tensors, param_shapes, progress_bar
from conversion.safetensors_io import SafetensorsError, SafetensorsFile, list_weight_files
from glm_jax.checkpoint import FORMAT_VERSION, MANIFEST, abstract_model, publish_dir, save_params
from glm_jax.components import COMPONENTS, FILE_SLOTS, component_dir_kind, detect_component, read_json


def convert_component(src: str, dst: str, expect_slot: str | None = None) -> str:
    """Converts one component directory `src` into `dst/<slot>/`; returns the slot name."""
    cfg_path = os.path.join(src, "config.json")
    hf_config = read_json(cfg_path)
    spec = detect_component(hf_config, cfg_path)
    if expect_slot is not None and spec.slot != expect_slot:
        raise ConversionError(f"{cfg_path}: describes {spec.hf_class}, but the pipeline slot {expect_slot!r} "
                              f"needs {COMPONENTS[expect_slot].hf_class}")
    try:
        _, abstract = abstract_model(spec.slot, hf_config)
    except (KeyError, TypeError, ValueError) as e:
        raise ConversionError(f"{cfg_path}: cannot build {spec.hf_class} from this config ({e})") from None
    expected = param_shapes(abstract)
    rules, ignore = spec.rules(), set(spec.ignore_on_import())
    files = [SafetensorsFile(p) for p in list_weight_files(src)]
    out_dir = os.path.join(dst, spec.slot)
    os.makedirs(out_dir)
    try:
        items = [(k, (lambda f=f, k=k: f.load(k)), f.info(k).shape, f.path) for f in files for k in f.keys()]  # noqa: SIM118
        bar = progress_bar(len(items), spec.slot)
        params = {}
        for path, arr in convert_tensors(items, rules, expected, source=src, ignore=lambda k: k in ignore):
            params[path] = arr
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
    finally:
        for f in files:
            f.close()
    for name in sorted(os.listdir(src)):
        if name.endswith(".json") and not name.endswith(".safetensors.index.json"):
            shutil.copy2(os.path.join(src, name), os.path.join(out_dir, name))
    save_params(os.path.join(out_dir, "params"), params)
    return spec.slot


def convert(src: str, dst: str, *, overwrite: bool = False, log=print) -> dict:
    """Converts `src` (pipeline or component directory) into the glm_jax checkpoint `dst`; returns the manifest."""
    src = os.path.abspath(src)
    dst = os.path.abspath(dst)
    if not os.path.isdir(src):
        raise ConversionError(f"{src}: source directory not found")
    if os.path.exists(dst) and os.listdir(dst) and not overwrite:
        raise ConversionError(f"{dst}: destination exists and is not empty (pass --overwrite to replace it)")
    kind = component_dir_kind(src)
    tmp = f"{dst}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    manifest = {"format_version": FORMAT_VERSION, "source_layout": kind, "components": {}}
    try:
        if kind == "pipeline":
            index = read_json(os.path.join(src, "model_index.json"))
            for slot in index:
                if slot.startswith("_"):
                    continue
                sub = os.path.join(src, slot)
                if slot in COMPONENTS:
                    if not os.path.isdir(sub):
                        raise ConversionError(f"{os.path.join(src, 'model_index.json')}: lists {slot!r} but "
                                              f"{sub} does not exist")
                    t0 = time.time()
                    convert_component(sub, tmp, expect_slot=slot)
                    manifest["components"][slot] = {"class": COMPONENTS[slot].hf_class}
                    log(f"converted {slot} in {time.time() - t0:.1f}s")
                elif slot in FILE_SLOTS and os.path.isdir(sub):
                    shutil.copytree(sub, os.path.join(tmp, slot))
                    manifest.setdefault("files", []).append(slot)
            shutil.copy2(os.path.join(src, "model_index.json"), os.path.join(tmp, "model_index.json"))
        else:
            t0 = time.time()
            slot = convert_component(src, tmp)
            manifest["components"][slot] = {"class": COMPONENTS[slot].hf_class}
            log(f"converted {slot} in {time.time() - t0:.1f}s")
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=2)
        publish_dir(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m conversion.from_torch", description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", required=True, help="HF/diffusers GLM-Image pipeline or component directory")
    ap.add_argument("--dst", required=True, help="glm_jax checkpoint directory to write")
    ap.add_argument("--overwrite", action="store_true", help="replace --dst if it exists")
    args = ap.parse_args(argv)
    try:
        manifest = convert(args.src, args.dst, overwrite=args.overwrite)
    except (ConversionError, SafetensorsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.dst} ({', '.join(manifest['components'])})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
