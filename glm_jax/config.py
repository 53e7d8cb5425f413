"""Training configuration: ml_collections `ConfigDict`s with named variants, command-line overrides and start-up
validation that names the offending field in one line.

    python -m glm_jax.train --config configs/t2i.py:tiny,dit --workdir runs/x --config.train.steps=200

`configs/<mode>.py` exports `get_config(arg)`; `arg` is a comma-separated list of variants (see
`apply_variants`). Every field exists in `base_config()`: an override of an unknown field, a value of the wrong
type, or an impossible combination is a `ConfigError`.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import math
import os
from typing import Any

from ml_collections import ConfigDict

MODES = ("t2i", "i2i")
COMPONENTS = ("ar", "dit", "both")
LOSS_TYPES = ("grpo", "dapo", "dr_grpo", "bnpo")
KERNELS = ("sde", "cps")
REMATS = ("none", "full", "dots", "dots_attention", "dots_all")
ATTENTIONS = ("", "xla", "cudnn")   # `model.attention`: "" = automatic (`pipeline.resolve_attention`)
DTYPES = ("float32", "bfloat16")
SCALES = ("group", "batch", "none")
AGGREGATES = ("sum_then_normalize", "normalize_then_sum")
LORA_TARGETS = ("attention", "mlp")


class ConfigError(ValueError):
    """A bad configuration; the message names the field."""


def base_config() -> ConfigDict:
    """Every field with its default (the real-model defaults of `design/grpo_math.md` §5 where they exist)."""
    c = ConfigDict()
    c.mode = "t2i"                       # t2i | i2i
    c.component = "ar"                   # ar | dit | both
    c.seed = 0
    c.model = ConfigDict(dict(
        ckpt="",                         # glm_jax checkpoint dir; "" = the embedded tiny random GLM-Image
        dtype="bfloat16",                # compute dtype
        param_dtype="float32",           # stored / trained parameter dtype (optimizer state is always fp32)
        attention="",                    # "" (auto: cuDNN on GPUs in bf16, else XLA), "xla" or "cudnn"
        remat="none",                    # DiT / AR layer remat: none | full | dots | dots_attention | dots_all
    ))
    c.data = ConfigDict(dict(
        path="data/t2i",                 # folder layout (prompts.txt + target_images/ ...) or a .jsonl manifest
        eval_path="",                    # "" = the eval split of `path` (eval_prompts.txt) if present
        shuffle=True,
    ))
    c.image = ConfigDict(dict(height=1024, width=1024))
    c.train = ConfigDict(dict(
        steps=1000,
        groups_per_step=16,              # prompts per optimizer step (each repeated group_size times)
        micro_batch=0,                   # samples per gradient-accumulation micro-batch; 0 = all at once
        num_iterations=1,                # inner epochs over one rollout
        compile_cache="",                # persistent XLA compilation cache directory ("" = off): reruns and
                                         # resumes load the compiled steps instead of compiling them again
    ))
    c.ar = ConfigDict(dict(
        group_size=8, temperature=0.9, top_p=0.75, top_k=0,          # top_k 0 = the whole code vocabulary
        lr=1e-6, warmup_steps=10, weight_decay=0.0, grad_clip=1.0, b1=0.9, b2=0.999,
        epsilon=0.2, epsilon_high=0.28, loss_type="grpo", beta=0.01,
        decode_steps=50, decode_guidance=1.5,   # the DiT ODE that renders AR samples for their rewards
    ))
    c.dit = ConfigDict(dict(
        group_size=16, num_steps=10, noise_level=0.7, kernel="sde",
        sde_window=3, timestep_fraction=0.0,    # window W (start ~ U{0..N//2-W}); or a fraction f > 0 of steps
        guidance=1.0,                           # CFG scale in rollout and training (1 = off)
        micro_steps=0,                          # trained steps of each sample per micro-batch (0 = all); with
                                                # train.micro_batch it bounds the update's memory (1024²: 1 x 1)
        clip_range=1e-4, adv_clip=5.0, beta=0.01,      # adv_clip: the DiT loss clips advantages to +-adv_clip
        lr=1e-5, warmup_steps=10, weight_decay=1e-4, grad_clip=1.0, b1=0.9, b2=0.999,
    ))
    c.reward = ConfigDict(dict(
        ar=ConfigDict({"lpips": 1.0}),          # weighted reward set for the AR policy
        dit=ConfigDict({"lpips": 1.0}),         # and for the DiT policy (never mixed in one z-score)
        options=ConfigDict(),                   # per-reward options, e.g. {"lpips": {"net": "vgg"}}
        scale_rewards="group", aggregate="sum_then_normalize", adv_clip=5.0,   # clip of the computed advantages
    ))
    c.lora = ConfigDict(dict(enabled=False, rank=32, alpha=64.0,
                             targets="attention,mlp"))       # comma-separated: attention, mlp
    c.ema = ConfigDict(dict(decay=0.0, every=1))             # decay 0 = no EMA; e.g. 0.9 every 8 or 0.995 every 1
    c.checkpoint = ConfigDict(dict(every=50, keep=3, async_save=True))
    c.log = ConfigDict(dict(
        every=1, images_every=10,
        eval_every=50,                   # evaluation on the eval split every N steps and at the end (0 = end only)
        eval_batches=1,                  # eval batches of groups_per_step prompts (0 = the whole eval split)
        eval_num_steps=50,               # DiT ODE steps of the evaluation images
        eval_guidance=1.5,               # CFG scale of the evaluation images (1 = off)
    ))
    c.mesh = ConfigDict(dict(
        data=-1, fsdp=1, tensor=1,
        gather_decode=True,              # AR sampling gathers the fsdp-split AR weights once per rollout (costs
                                         # their full size per device) instead of per layer at every token
        gather_dit=True,                 # the same for the DiT's sampling loops (SDE rollout, ODE render, eval)
        gather_frozen=True,              # an update gathers its frozen weights (LoRA: the base model) once, not
                                         # per layer in every micro-batch
        gather_trained=False,            # an update gathers its trained weights once, not per layer in every
                                         # micro-batch (costs their full size per device; see docs/parallelism.md)
    ))
    return c


def apply_variants(c: ConfigDict, arg: str | None) -> ConfigDict:
    """Named variants, comma-separated: `tiny` (the embedded default: tiny model, sample data, CPU sizes),
    `ar` / `dit` / `both` (component), `lora` (LoRA fine-tuning with the LoRA learning rates of grpo_math §5),
    `full` (full fine-tuning). `tiny` is applied first, so `tiny,lora` keeps the tiny learning rates."""
    names = [a.strip() for a in (arg or "").split(",") if a.strip()]
    for name in names:
        if name not in (*COMPONENTS, "lora", "full", "tiny"):
            raise ConfigError(f"unknown config variant {name!r} (known: tiny, ar, dit, both, lora, full)")
    if "tiny" in names:
        _tiny(c)
    for name in names:
        if name in COMPONENTS:
            c.component = name
        elif name == "lora":
            c.lora.enabled = True
            if "tiny" not in names:
                c.ar.lr, c.dit.lr = 1e-5, 3e-4
        elif name == "full":
            c.lora.enabled = False
    return c


def _tiny(c: ConfigDict) -> None:
    """The embedded default: the tiny random GLM-Image on the sample data, sized for a few CPU minutes. The DiT
    learns to raise an image-statistics reward (`aesthetic_heuristic` colourfulness + contrast; plus `structure`
    to the source for I2I) within the run (about +15% in 200 steps); the AR's reward is LPIPS to the target."""
    c.model.ckpt = ""
    c.model.dtype = "float32"
    c.image.height = c.image.width = 64
    c.data.path = f"data/{c.mode}"
    c.component = "dit"
    c.train.steps = 200
    c.train.groups_per_step = 2
    c.ar.group_size = 4
    c.ar.decode_steps = 4
    c.ar.decode_guidance = 1.0
    c.ar.lr = 3e-3
    c.ar.warmup_steps = 0
    c.ar.beta = 0.0
    c.dit.group_size = 8
    c.dit.num_steps = 4
    c.dit.sde_window = 2
    c.dit.lr = 2e-2
    c.dit.warmup_steps = 0
    c.dit.clip_range = 1e-2
    c.dit.beta = 1e-4
    c.reward.ar = ConfigDict({"lpips": 1.0})
    c.reward.dit = ConfigDict({"aesthetic_heuristic": 1.0, **({"structure": 0.2} if c.mode == "i2i" else {})})
    c.reward.options = ConfigDict({"aesthetic_heuristic": {"weights": {"colourfulness": 1.0, "contrast": 1.0}}})
    c.checkpoint.every = 50
    c.log.images_every = 20
    c.log.eval_every = 50
    c.log.eval_num_steps = 4
    c.log.eval_guidance = 1.0


def load_config(spec: str) -> ConfigDict:
    """Loads `path/to/config.py[:variants]` by calling its `get_config(variants)`."""
    path, _, arg = spec.partition(":")
    if not os.path.exists(path):
        raise ConfigError(f"--config: file {path} not found")
    module_spec = importlib.util.spec_from_file_location("glm_jax_user_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"--config: {path} has no get_config(arg) function")
    cfg = module.get_config(arg or None)
    if not isinstance(cfg, ConfigDict):
        raise ConfigError(f"--config: {path}: get_config must return an ml_collections.ConfigDict")
    return cfg


def _parse_value(text: str, current: Any, field: str) -> Any:
    if isinstance(current, bool):
        low = text.lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise ConfigError(f"--config.{field}={text}: expected a boolean")
    if isinstance(current, str):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise ConfigError(f"--config.{field}={text}: cannot parse a {type(current).__name__}") from None
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(current, ConfigDict):
        if not isinstance(value, dict):
            raise ConfigError(f"--config.{field}={text}: expected a dict like {{'lpips': 1.0}}")
        return ConfigDict(value)
    if type(value) is not type(current):
        raise ConfigError(f"--config.{field}={text}: expected {type(current).__name__}, got {type(value).__name__}")
    return value


def apply_overrides(c: ConfigDict, overrides: dict[str, str]) -> ConfigDict:
    """Applies `{"train.steps": "200", ...}`; unknown fields and wrong types are `ConfigError`s."""
    for field, text in overrides.items():
        parts = field.split(".")
        node = c
        for i, p in enumerate(parts[:-1]):
            if p not in node or not isinstance(node[p], ConfigDict):
                raise ConfigError(f"--config.{field}: unknown config field {'.'.join(parts[:i + 1])!r}")
            node = node[p]
        leaf = parts[-1]
        if leaf not in node:
            raise ConfigError(f"--config.{field}: unknown config field {field!r}")
        node[leaf] = _parse_value(text, node[leaf], field)
    return c


def _check(ok: bool, field: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"config.{field}: {msg}")


def validate(c: ConfigDict) -> ConfigDict:
    """Semantic checks that need no model or data (those come at start-up in the trainer)."""
    known = base_config()
    _same_fields(c, known, "")
    _check(c.mode in MODES, "mode", f"{c.mode!r} is not one of {MODES}")
    _check(c.component in COMPONENTS, "component", f"{c.component!r} is not one of {COMPONENTS}")
    _check(c.model.dtype in DTYPES, "model.dtype", f"{c.model.dtype!r} is not one of {DTYPES}")
    _check(c.model.param_dtype in DTYPES, "model.param_dtype", f"{c.model.param_dtype!r} is not one of {DTYPES}")
    _check(c.model.attention in ATTENTIONS, "model.attention", "must be '', 'xla' or 'cudnn'")
    _check(c.model.remat in REMATS, "model.remat", f"{c.model.remat!r} is not one of {REMATS}")
    for f in ("height", "width"):
        v = c.image[f]
        _check(v > 0 and v % 32 == 0, f"image.{f}", f"{v} is not a positive multiple of 32")
    _check(c.train.steps >= 1, "train.steps", "must be >= 1")
    _check(c.train.groups_per_step >= 1, "train.groups_per_step", "must be >= 1")
    _check(c.train.micro_batch >= 0, "train.micro_batch", "must be >= 0 (0 = whole batch)")
    _check(c.train.num_iterations >= 1, "train.num_iterations", "must be >= 1")
    for part in ("ar", "dit"):
        p = c[part]
        _check(p.group_size >= 2, f"{part}.group_size", "GRPO needs at least 2 samples per group")
        _check(p.lr >= 0, f"{part}.lr", "must be >= 0")
        _check(p.warmup_steps >= 0, f"{part}.warmup_steps", "must be >= 0")
        _check(p.grad_clip > 0, f"{part}.grad_clip", "must be > 0")
        _check(p.beta >= 0, f"{part}.beta", "must be >= 0")
        gs_total = c.train.groups_per_step * p.group_size
        if c.train.micro_batch:
            _check(gs_total % c.train.micro_batch == 0, "train.micro_batch",
                   f"{c.train.micro_batch} does not divide groups_per_step x {part}.group_size = {gs_total}")
    _check(0 < c.ar.temperature, "ar.temperature", "must be > 0")
    _check(0 < c.ar.top_p <= 1, "ar.top_p", "must be in (0, 1]")
    _check(c.ar.top_k >= 0, "ar.top_k", "must be >= 0")
    _check(c.ar.loss_type in LOSS_TYPES, "ar.loss_type", f"{c.ar.loss_type!r} is not one of {LOSS_TYPES}")
    _check(0 <= c.ar.epsilon < 1, "ar.epsilon", "must be in [0, 1)")
    _check(c.ar.epsilon_high >= 0, "ar.epsilon_high", "must be >= 0")
    _check(c.ar.decode_steps >= 1, "ar.decode_steps", "must be >= 1")
    _check(c.dit.kernel in KERNELS, "dit.kernel", f"{c.dit.kernel!r} is not one of {KERNELS}")
    _check(c.dit.num_steps >= 2, "dit.num_steps", "must be >= 2")
    _check(c.dit.noise_level >= 0, "dit.noise_level", "must be >= 0")
    _check(0 <= c.dit.timestep_fraction <= 1, "dit.timestep_fraction", "must be in [0, 1]")
    if c.dit.timestep_fraction == 0:
        _check(1 <= c.dit.sde_window <= max(c.dit.num_steps // 2, 1), "dit.sde_window",
               f"{c.dit.sde_window} must be in 1..num_steps//2 ({c.dit.num_steps // 2}) when timestep_fraction is 0")
    _check(c.dit.micro_steps >= 0, "dit.micro_steps", "must be >= 0 (0 = all trained steps)")
    if c.dit.micro_steps:
        from glm_jax.grpo.rollout import DitRolloutConfig
        j = DitRolloutConfig(num_steps=c.dit.num_steps, sde_window=c.dit.sde_window,
                             timestep_fraction=c.dit.timestep_fraction).num_sde_steps   # trained steps per sample
        _check(j % c.dit.micro_steps == 0, "dit.micro_steps",
               f"{c.dit.micro_steps} does not divide the {j} trained steps per sample")
    _check(c.dit.clip_range > 0, "dit.clip_range", "must be > 0")
    _check(c.dit.adv_clip > 0, "dit.adv_clip", "must be > 0")
    _check(c.dit.guidance >= 1, "dit.guidance", "must be >= 1 (1 = no CFG)")
    _check(c.reward.scale_rewards in SCALES, "reward.scale_rewards", f"must be one of {SCALES}")
    _check(c.reward.aggregate in AGGREGATES, "reward.aggregate", f"must be one of {AGGREGATES}")
    _check(c.reward.adv_clip > 0, "reward.adv_clip", "must be > 0")
    for part in ("ar", "dit"):
        if c.component in (part, "both"):
            _check(len(c.reward[part]) > 0, f"reward.{part}", f"component {c.component!r} needs at least one reward")
    _check(c.lora.rank >= 1, "lora.rank", "must be >= 1")
    _check(math.isfinite(c.lora.alpha) and c.lora.alpha > 0, "lora.alpha", "must be a finite number > 0")
    targets = [t.strip() for t in c.lora.targets.split(",") if t.strip()]
    _check(bool(targets) and all(t in LORA_TARGETS for t in targets), "lora.targets",
           f"{c.lora.targets!r} must be a comma-separated list of {', '.join(LORA_TARGETS)}")
    _check(0 <= c.ema.decay < 1, "ema.decay", "must be in [0, 1)")
    _check(c.ema.every >= 1, "ema.every", "must be >= 1")
    _check(c.checkpoint.every >= 1, "checkpoint.every", "must be >= 1")
    _check(c.checkpoint.keep >= 1, "checkpoint.keep", "must be >= 1")
    for f in ("every", "images_every", "eval_every", "eval_batches"):
        _check(c.log[f] >= 0, f"log.{f}", "must be >= 0")
    _check(c.log.eval_num_steps >= 1, "log.eval_num_steps", "must be >= 1")
    _check(c.log.eval_guidance >= 1, "log.eval_guidance", "must be >= 1 (1 = no CFG)")
    return c


def _same_fields(c: ConfigDict, known: ConfigDict, prefix: str) -> None:
    """Unknown or mistyped fields (a config file that adds or retypes a field)."""
    free = {"reward.ar", "reward.dit", "reward.options"}
    for key in c.keys():  # noqa: SIM118 (ConfigDict)
        path = f"{prefix}{key}"
        if key not in known:
            raise ConfigError(f"config.{path}: unknown config field")
        if path in free:
            continue
        v, k = c[key], known[key]
        if isinstance(k, ConfigDict):
            if not isinstance(v, ConfigDict):
                raise ConfigError(f"config.{path}: expected a section, got {type(v).__name__}")
            _same_fields(v, k, path + ".")
        elif isinstance(k, float) and isinstance(v, int) and not isinstance(v, bool):
            continue
        elif type(v) is not type(k):
            raise ConfigError(f"config.{path}: expected {type(k).__name__}, got {type(v).__name__} ({v!r})")


def config_changes(old: dict, new: dict) -> list[str]:
    """`field: old -> new` for each field whose value differs between two resolved configs (dicts as saved in
    JSON; a field one of them lacks shows as `<absent>`)."""
    def flat(d: Any, prefix: str = "") -> dict[str, Any]:
        if not isinstance(d, dict):
            return {prefix[:-1]: d}
        if not d and prefix:
            return {prefix[:-1]: {}}
        return {k: v for key, val in d.items() for k, v in flat(val, f"{prefix}{key}.").items()}
    a, b = (flat(json.loads(json.dumps(x, sort_keys=True))) for x in (old, new))
    return [f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}" for k in sorted(set(a) | set(b))
            if a.get(k, "<absent>") != b.get(k, "<absent>")]


def save_config(c: ConfigDict, path: str) -> None:
    """Writes the resolved config as JSON (atomically)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(c.to_dict(), f, indent=2, sort_keys=True)
    os.replace(tmp, path)
