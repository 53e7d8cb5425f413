"""LoRA for GLM-Image: low-rank adapters on the AR text decoder and the DiT blocks, and their merge.

An adapted `Dense` (`glm_jax.models.layers.Dense`) computes `x @ W (+ b) + (alpha / rank) * (x @ A) @ B` with
`A` `(in, rank)` and `B` `(rank, out)` held as `LoraParam`s (a subclass of `nnx.Param`), so one filter selects
them for training while the base weights stay frozen:

    lora = LoraConfig(rank=32, alpha=64.0, targets=("attention", "mlp"))    # or LoraConfig.from_config(cfg.lora)
    paths = add_lora(ar_module, lora, rngs=nnx.Rngs(0))                     # in place; B = 0: output unchanged
    graphdef, policy = init_policy(ar_module, tx, lora_trainable)           # only the adapters are trained
    ref_params = adapters_off(policy.params)                                # the base model as the reference

Targets (`TARGETS`), by module path:

    model        "attention"                                   "mlp"
    GlmImageAR   text.layers.{i}.self_attn.{q,k,v,o}_proj      text.layers.{i}.mlp.{gate_up_proj,down_proj}
    GlmImageDiT  transformer_blocks.{i}.attn1.{to_q,to_k,to_v,to_out}   transformer_blocks.{i}.ff.{proj_in,proj_out}

The AR's vision tower, VQ, embeddings and `lm_head`, and the DiT's adaLN / embedders / projectors are never adapted.

In a glm_jax checkpoint, adapters are extra keys `<dense path>.lora_a` / `.lora_b` of `<slot>/params` described by
the manifest entry `"lora": {"<slot>": {"rank": r, "alpha": a, "targets": [...]}}`; `merge_flat` folds them into
the kernels (`kernel + alpha / rank * A @ B`, float32, cast back), which is what `checkpoint.load_model` and
`python -m conversion.to_torch` do by default.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from glm_jax.models.layers import Dense, DType

A_SUFFIX, B_SUFFIX = ".lora_a", ".lora_b"

# model class name -> target name -> regex over the dot-joined Dense path
TARGETS: dict[str, dict[str, str]] = {
    "GlmImageAR": {"attention": r"text\.layers\.\d+\.self_attn\.(q|k|v|o)_proj",
                   "mlp": r"text\.layers\.\d+\.mlp\.(gate_up_proj|down_proj)"},
    "GlmImageDiT": {"attention": r"transformer_blocks\.\d+\.attn1\.to_(q|k|v|out)",
                    "mlp": r"transformer_blocks\.\d+\.ff\.proj_(in|out)"},
}
TARGET_NAMES: tuple[str, ...] = ("attention", "mlp")


class LoraParam(nnx.Param):
    """The variable type of LoRA adapter weights (`lora_a`, `lora_b`): `nnx.split(m, LoraParam, ...)` selects them."""


@dataclass(frozen=True)
class LoraConfig:
    """LoRA rank, `alpha` (the update is scaled by `alpha / rank`) and target groups (`"attention"`, `"mlp"`)."""

    rank: int
    alpha: float
    targets: tuple[str, ...] = ("attention", "mlp")

    def __post_init__(self):
        targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        object.__setattr__(self, "targets", targets)
        if isinstance(self.rank, bool) or not isinstance(self.rank, (int, np.integer)) or self.rank <= 0:
            raise ValueError(f"LoRA rank must be an integer >= 1, got {self.rank!r}")
        if not (isinstance(self.alpha, (int, float, np.number)) and math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"LoRA alpha must be a finite number > 0, got {self.alpha!r}")
        if not targets:
            raise ValueError(f"LoRA targets are empty (choose from {', '.join(TARGET_NAMES)})")
        for t in targets:
            if t not in TARGET_NAMES:
                raise ValueError(f"unknown LoRA target {t!r} (known: {', '.join(TARGET_NAMES)})")

    @property
    def scale(self) -> float:
        """`alpha / rank`, the factor of the low-rank update."""
        return float(self.alpha) / int(self.rank)

    @classmethod
    def from_config(cls, section: Any) -> LoraConfig | None:
        """Reads the ml_collections section `lora` (`enabled`, `rank`, `alpha`, `targets` as "attention,mlp");
        None when `enabled` is false."""
        if not section.get("enabled", True):
            return None
        targets = section.get("targets", "attention,mlp")
        if isinstance(targets, str):
            targets = tuple(t.strip() for t in targets.split(",") if t.strip())
        return cls(rank=int(section["rank"]), alpha=float(section["alpha"]), targets=tuple(targets))

    def to_manifest(self) -> dict:
        """The checkpoint manifest entry `{"rank", "alpha", "targets"}`."""
        return {"rank": int(self.rank), "alpha": float(self.alpha), "targets": list(self.targets)}

    @classmethod
    def from_manifest(cls, entry: Mapping, where: str = "glm_jax.json") -> LoraConfig:
        """Reads a manifest entry written by `to_manifest`; a ValueError naming `where` when it is malformed."""
        if not isinstance(entry, Mapping) or "rank" not in entry or "alpha" not in entry:
            raise ValueError(f"{where}: LoRA entry must hold 'rank' and 'alpha', got {entry!r}")
        try:
            return cls(rank=entry["rank"], alpha=float(entry["alpha"]),
                       targets=tuple(entry.get("targets", TARGET_NAMES)))
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None


# ------------------------------------------------------------------------------------------------ modules


def _path_str(path: Sequence) -> str:
    return ".".join(str(p) for p in path)


def target_paths(module: nnx.Module, targets: Sequence[str] = TARGET_NAMES) -> list[str]:
    """Dot-joined paths of the `Dense` layers of `module` (a `GlmImageAR` or `GlmImageDiT`) that `targets` select."""
    table = TARGETS.get(type(module).__name__)
    if table is None:
        raise ValueError(f"LoRA: {type(module).__name__} has no LoRA targets (supported: {', '.join(TARGETS)})")
    for t in targets:
        if t not in table:
            raise ValueError(f"unknown LoRA target {t!r} (known: {', '.join(table)})")
    pattern = re.compile("|".join(f"(?:{table[t]})" for t in targets) + r"\Z")
    return [_path_str(p) for p, node in nnx.iter_graph(module)
            if isinstance(node, Dense) and pattern.match(_path_str(p))]


def _dense_at(module: nnx.Module, path: str) -> Dense:
    node = module
    for part in path.split("."):
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    return node


def add_lora(module: nnx.Module, cfg: LoraConfig, *, rngs: nnx.Rngs, param_dtype: DType = jnp.float32
             ) -> list[str]:
    """Gives every targeted `Dense` of `module` adapters `lora_a` `(in, rank)` (PEFT's uniform init,
    bound `1/sqrt(in)`) and `lora_b = 0` `(rank, out)` in `param_dtype`, in place; returns the adapted paths.

    B = 0 makes the adapted model compute exactly the base outputs. Logical axes: `(in axis, None)` and
    `(None, out axis)` of the kernel.
    """
    paths = target_paths(module, cfg.targets)
    if not paths:
        raise ValueError(f"LoRA: no Dense layer of {type(module).__name__} matches targets {cfg.targets}")
    for p in paths:
        dense = _dense_at(module, p)
        if dense.lora_a is not None:
            raise ValueError(f"LoRA: {p} already has adapters")
        in_axis, out_axis = dense.kernel.get_metadata().get("axes", (None, None))
        bound = 1.0 / math.sqrt(dense.in_features)
        a = jax.random.uniform(rngs.params(), (dense.in_features, cfg.rank), param_dtype, -bound, bound)
        dense.lora_a = LoraParam(a, axes=(in_axis, None))
        dense.lora_b = LoraParam(jnp.zeros((cfg.rank, dense.out_features), param_dtype), axes=(None, out_axis))
        dense.lora_scale = cfg.scale
    return paths


def lora_trainable(path, value) -> bool:
    """nnx filter of the adapter weights (the trained params of a LoRA run)."""
    return isinstance(value, LoraParam)


def _key_name(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def adapters_off(lora_state):
    """The adapter tree (an `nnx.State`, nested or flat dict) with every `lora_b` zeroed and every `lora_a` copied:
    merged as the reference params it gives the base model exactly, with no second copy of the base weights.
    `lora_a` is copied so that donating the training state never deletes the reference's buffers."""

    def f(path, x):
        names = {_key_name(k) for k in path}
        is_b = "lora_b" in names or any(n.endswith(B_SUFFIX) for n in names)
        return jnp.zeros_like(x) if is_b else jnp.copy(x)

    return jax.tree_util.tree_map_with_path(f, lora_state)


def lora_state_dict(module: nnx.Module) -> dict[str, np.ndarray]:
    """Flat `{"<dense path>.lora_a" / ".lora_b": array}` of a module's adapters (what a checkpoint stores)."""
    return {_path_str(p): np.asarray(v.get_value())
            for p, v in nnx.to_flat_state(nnx.state(module, LoraParam))}


# -------------------------------------------------------------------------------------------- flat params


def adapter_pairs(keys) -> dict[str, tuple[str, str]]:
    """`{dense path: (a key, b key)}` of the adapter keys among flat parameter `keys`; a ValueError names a key
    whose partner is missing."""
    keys = set(keys)
    out = {}
    for k in sorted(keys):
        for suffix, other in ((A_SUFFIX, B_SUFFIX), (B_SUFFIX, A_SUFFIX)):
            if k.endswith(suffix):
                base = k[: -len(suffix)]
                if base + other not in keys:
                    raise ValueError(f"LoRA key {k!r} has no partner {base + other!r}")
                out[base] = (base + A_SUFFIX, base + B_SUFFIX)
    return out


def is_adapter_key(key: str) -> bool:
    """True for a flat `<dense path>.lora_a` / `.lora_b` key."""
    return key.endswith((A_SUFFIX, B_SUFFIX))


def check_adapter_shapes(shapes: Mapping[str, tuple[int, ...]], rank: int, where: str = "params") -> None:
    """Checks, from a flat `{key: shape}`, that every adapter pair fits its kernel: A `(in, rank)`, B `(rank, out)`."""
    for base, (ka, kb) in adapter_pairs(shapes).items():
        kk = base + ".kernel"
        if kk not in shapes:
            raise ValueError(f"{where}: LoRA key {ka!r} adapts {kk!r}, which does not exist")
        d_in, d_out = tuple(shapes[kk])
        if tuple(shapes[ka]) != (d_in, rank) or tuple(shapes[kb]) != (rank, d_out):
            raise ValueError(f"{where}: LoRA {ka!r} {tuple(shapes[ka])} / {kb!r} {tuple(shapes[kb])} do not fit "
                             f"kernel {tuple(shapes[kk])} at rank {rank} (expected {(d_in, rank)} / {(rank, d_out)})")


def lora_delta(a: np.ndarray, b: np.ndarray, rank: int, alpha: float) -> np.ndarray:
    """`alpha / rank * A @ B` in float32 (the kernel update, `(in, out)`)."""
    return (np.float32(alpha / rank) * (np.asarray(a, np.float32) @ np.asarray(b, np.float32))).astype(np.float32)


def merge_flat(flat: Mapping[str, np.ndarray], rank: int, alpha: float) -> dict[str, np.ndarray]:
    """Flat `{nnx path: array}` with adapter keys -> the plain model's flat params: every adapted kernel becomes
    `kernel + alpha / rank * A @ B` (float32, cast back to the kernel's dtype); adapter keys are dropped."""
    check_adapter_shapes({k: np.shape(v) for k, v in flat.items()}, rank)
    out = {k: v for k, v in flat.items() if not is_adapter_key(k)}
    for base, (ka, kb) in adapter_pairs(flat).items():
        kernel = np.asarray(out[base + ".kernel"])
        merged = np.asarray(kernel, np.float32) + lora_delta(flat[ka], flat[kb], rank, alpha)
        out[base + ".kernel"] = merged.astype(kernel.dtype)
    return out


def read_checkpoint_lora(manifest: Mapping, slot: str, shapes: Mapping[str, tuple[int, ...]],
                         where: str) -> LoraConfig | None:
    """The `LoraConfig` of a checkpoint component from its manifest and its flat parameter `shapes` (None without
    adapters). Adapter keys need the manifest entry `lora.<slot>` (a ValueError names the key); an entry without
    adapter keys means a plain component."""
    keys = sorted(k for k in shapes if is_adapter_key(k))
    entry = (manifest.get("lora") or {}).get(slot)
    if keys and entry is None:
        raise ValueError(f"{where}: LoRA adapter key {keys[0]!r} but glm_jax.json has no \"lora\" entry for "
                         f"{slot!r}")
    if not keys:   # an entry without adapter keys (nothing was adapted) is a plain component
        return None
    cfg = LoraConfig.from_manifest(entry, f"glm_jax.json lora.{slot}")
    check_adapter_shapes(shapes, cfg.rank, where)
    return cfg
