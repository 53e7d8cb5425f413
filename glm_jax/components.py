"""The GLM-Image components glm_jax knows, how to recognise their `config.json`, and how to build their modules.

Slot names are the diffusers pipeline's (`model_index.json`): `vision_language_encoder` (AR), `transformer` (DiT),
`vae`, `text_encoder` (ByT5 glyph encoder). Non-weight folders (`processor`, `tokenizer`, `scheduler`) are copied
verbatim by the conversion.
"""

from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass
from typing import Any

PIPELINE_CLASS = "GlmImagePipeline"
FILE_SLOTS = ("processor", "tokenizer", "scheduler")


@dataclass(frozen=True)
class ComponentSpec:
    slot: str
    hf_class: str
    module: str
    config_cls: str
    model_cls: str
    table: str
    weights_stem: str

    def config_from_hf(self, cfg: dict) -> Any:
        return getattr(importlib.import_module(self.module), self.config_cls).from_hf(cfg)

    def model_class(self):
        return getattr(importlib.import_module(self.module), self.model_cls)

    def rules(self):
        return importlib.import_module(self.table).RULES

    def ignore_on_import(self) -> tuple[str, ...]:
        return tuple(getattr(importlib.import_module(self.table), "IGNORE_ON_IMPORT", ()))


COMPONENTS: dict[str, ComponentSpec] = {
    "vision_language_encoder": ComponentSpec("vision_language_encoder", "GlmImageForConditionalGeneration",
                                             "glm_jax.models.ar", "ArConfig", "GlmImageAR",
                                             "conversion.tables.ar", "model"),
    "transformer": ComponentSpec("transformer", "GlmImageTransformer2DModel", "glm_jax.models.dit", "DiTConfig",
                                 "GlmImageDiT", "conversion.tables.dit", "diffusion_pytorch_model"),
    "vae": ComponentSpec("vae", "AutoencoderKL", "glm_jax.models.vae", "VAEConfig", "AutoencoderKL",
                         "conversion.tables.vae", "diffusion_pytorch_model"),
    "text_encoder": ComponentSpec("text_encoder", "T5EncoderModel", "glm_jax.models.t5", "T5Config", "T5Encoder",
                                  "conversion.tables.t5", "model"),
}


def read_json(path: str) -> dict:
    """Reads a JSON object; raises ValueError naming the file when it is missing or malformed."""
    try:
        with open(path) as f:
            out = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(out, dict):
        raise ValueError(f"{path}: expected a JSON object")  # noqa: TRY004 (bad file content, not a bad argument)
    return out


def detect_component(config: dict, path: str) -> ComponentSpec:
    """The component a HF/diffusers `config.json` describes; ValueError naming the file for anything else."""
    cls = config.get("_class_name")
    archs = config.get("architectures") or []
    mtype = config.get("model_type")
    if mtype == "glm_image" or "GlmImageForConditionalGeneration" in archs:
        return COMPONENTS["vision_language_encoder"]
    if cls == "GlmImageTransformer2DModel":
        return COMPONENTS["transformer"]
    if cls == "AutoencoderKL":
        return COMPONENTS["vae"]
    if mtype == "t5" or "T5EncoderModel" in archs:
        return COMPONENTS["text_encoder"]
    what = f"_class_name {cls!r}" if cls else f"model_type {mtype!r}"
    known = ", ".join(s.hf_class for s in COMPONENTS.values())
    raise ValueError(f"{path}: {what} is not a GLM-Image component (expected one of: {known})")


def component_dir_kind(directory: str) -> str:
    """'pipeline' if `directory` holds a GlmImagePipeline `model_index.json`, else 'component'."""
    mi = os.path.join(directory, "model_index.json")
    if os.path.exists(mi):
        index = read_json(mi)
        if index.get("_class_name") != PIPELINE_CLASS:
            raise ValueError(f"{mi}: _class_name {index.get('_class_name')!r} is not {PIPELINE_CLASS}")
        return "pipeline"
    if not os.path.exists(os.path.join(directory, "config.json")):
        raise ValueError(f"{directory}: neither model_index.json nor config.json found")
    return "component"
