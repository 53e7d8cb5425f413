"""The glm_jax model checkpoint: a self-contained directory that generation and training read directly.

Layout (written by `python -m conversion.from_torch`):

    CKPT/
      glm_jax.json                  format version, the components it holds, the source layout
      model_index.json              the pipeline's, when converted from a pipeline directory
      <slot>/config.json            the HF/diffusers config of each component, verbatim (+ other *.json files)
      <slot>/params/                orbax checkpoint of the parameters, nested by nnx path, source dtypes kept
      processor/ tokenizer/ scheduler/   copied verbatim from the pipeline

Slots: `vision_language_encoder` (AR), `transformer` (DiT), `vae`, `text_encoder`. See `glm_jax.components`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from glm_jax.components import COMPONENTS, read_json

FORMAT_VERSION = 1
MANIFEST = "glm_jax.json"


def publish_dir(tmp: str, dst: str) -> None:
    """Moves a fully written directory `tmp` to `dst` by renames, replacing an existing `dst` only once `tmp`
    is complete, so a reader never sees a half-written `dst`."""
    import shutil
    if os.path.exists(dst):
        old = f"{dst}.old-{os.getpid()}"
        os.replace(dst, old)
        os.replace(tmp, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dst)


def nest(flat: Mapping[str, Any]) -> dict:
    """`{"a.b.0.c": x}` -> `{"a": {"b": {"0": {"c": x}}}}`."""
    out: dict = {}
    for path, value in flat.items():
        node = out
        parts = path.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Inverse of `nest`."""
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def save_params(directory: str, flat: Mapping[str, np.ndarray]) -> None:
    """Saves a flat `{path: array}` dict as an orbax checkpoint at `directory` (which must not exist)."""
    import orbax.checkpoint as ocp
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(os.path.abspath(directory), nest(flat))
    ckptr.wait_until_finished()


def load_params(directory: str, target: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Restores a flat `{path: array}` dict. `target` (flat `{path: ShapeDtypeStruct}` possibly with shardings)
    restores straight into those dtypes / shardings."""
    import orbax.checkpoint as ocp
    ckptr = ocp.StandardCheckpointer()
    path = os.path.abspath(directory)
    if not os.path.isdir(path):
        raise ValueError(f"{directory}: parameter checkpoint not found")
    restored = ckptr.restore(path, nest(target)) if target is not None else ckptr.restore(path)
    return flatten(restored)


def read_manifest(ckpt: str) -> dict:
    """The checkpoint's `glm_jax.json`; a ValueError that says what `ckpt` is instead when it is not a glm_jax
    checkpoint (missing, not a directory, a PyTorch / diffusers directory still to be converted, or a training
    workdir still to be exported)."""
    if not os.path.exists(ckpt):
        raise ValueError(f"{ckpt}: no such directory")
    if not os.path.isdir(ckpt):
        raise ValueError(f"{ckpt}: not a directory (a glm_jax checkpoint is a directory holding {MANIFEST})")
    if not os.path.exists(os.path.join(ckpt, MANIFEST)):
        if os.path.isdir(os.path.join(ckpt, "checkpoints")) and os.path.exists(os.path.join(ckpt, "config.json")):
            raise ValueError(f"{ckpt}: a training workdir, not a glm_jax checkpoint; export its trained weights "
                             f"first with `python -m glm_jax.export --workdir {ckpt} --out DIR`")
        if any(os.path.exists(os.path.join(ckpt, f)) for f in ("model_index.json", "config.json")):
            raise ValueError(f"{ckpt}: a PyTorch (transformers / diffusers) directory, not a glm_jax checkpoint; "
                             f"convert it once with `python -m conversion.from_torch --src {ckpt} --dst DIR`")
        raise ValueError(f"{ckpt}: not a glm_jax checkpoint (no {MANIFEST}; `python -m conversion.from_torch` "
                         "writes one)")
    return read_json(os.path.join(ckpt, MANIFEST))


def component_config(ckpt: str, slot: str) -> dict:
    """The HF/diffusers config dict of a component of a glm_jax checkpoint; a clear error if absent."""
    manifest = read_manifest(ckpt)
    if slot not in manifest.get("components", {}):
        have = sorted(manifest.get("components", {}))
        raise ValueError(f"{ckpt}: checkpoint has no {slot!r} component (it has {have})")
    return read_json(os.path.join(ckpt, slot, "config.json"))


def abstract_model(slot: str, hf_config: dict, *, dtype=jnp.float32, param_dtype=jnp.float32, lora=None):
    """An abstract (shape-only) module for a component, built from its HF config; `lora` (a
    `glm_jax.lora.LoraConfig`) adds float32 adapters to its targets."""
    spec = COMPONENTS[slot]
    cfg = spec.config_from_hf(hf_config)
    cls = spec.model_class()

    def build():
        module = cls(cfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0))
        if lora is not None:
            from glm_jax.lora import add_lora
            add_lora(module, lora, rngs=nnx.Rngs(0))
        return module

    return cfg, nnx.eval_shape(build)


def stored_metadata(params_dir: str) -> dict[str, Any]:
    """Flat `{path: metadata with .shape / .dtype}` of an orbax parameter checkpoint, without reading arrays."""
    import orbax.checkpoint as ocp
    if not os.path.isdir(params_dir):
        raise ValueError(f"{params_dir}: parameter checkpoint not found")
    meta = ocp.StandardCheckpointer().metadata(os.path.abspath(params_dir))
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    return flatten(tree)


def checkpoint_lora(ckpt: str, slot: str, stored_meta: Mapping[str, Any] | None = None):
    """The `glm_jax.lora.LoraConfig` of the adapters stored with `slot`, or None when it has none.

    Checks that adapter keys have the manifest entry `lora.<slot>` and fit their kernels."""
    from glm_jax.lora import read_checkpoint_lora
    params_dir = os.path.join(ckpt, slot, "params")
    if stored_meta is None:
        stored_meta = stored_metadata(params_dir)
    shapes = {k: tuple(m.shape) for k, m in stored_meta.items()}
    return read_checkpoint_lora(read_manifest(ckpt), slot, shapes, params_dir)


def _replicated(sharding):
    """A sharding that replicates a (small) array over the devices of `sharding`."""
    from jax.sharding import NamedSharding, PartitionSpec
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, PartitionSpec())
    return sharding


def _merged_kernel(kernel: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """`kernel + scale * a @ b` in float32 (exact matmul precision), cast back; keeps the kernel's sharding."""
    fn = jax.jit(lambda k, x, y: (k.astype(jnp.float32) + scale * jnp.dot(
        x.astype(jnp.float32), y.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)).astype(k.dtype))
    out = fn(kernel, a, b)
    sharding = getattr(kernel, "sharding", None)
    return out if sharding is None else jax.device_put(out, sharding)


def load_model(ckpt: str, slot: str, *, dtype=jnp.float32, param_dtype=None, shardings=None, lora: str = "merge"):
    """Builds the module of `slot` from a glm_jax checkpoint and fills in its parameters.

    `param_dtype=None` keeps the stored dtypes. `shardings`, a function `(path, ShapeDtypeStruct) -> Sharding`,
    restores each parameter straight into its sharding. LoRA adapters stored with the component (manifest entry
    `lora.<slot>`) are merged into their kernels by default (`lora="merge"`: the plain model, e.g. for
    generation); `lora="keep"` returns the module with the adapters attached (`glm_jax.lora.add_lora`, adapters
    in their stored dtype), e.g. to continue training them. Returns `(cfg, module)`.
    """
    if lora not in ("merge", "keep"):
        raise ValueError(f"load_model: lora={lora!r}; expected 'merge' or 'keep'")
    hf_config = component_config(ckpt, slot)
    params_dir = os.path.join(ckpt, slot, "params")
    stored_meta = stored_metadata(params_dir)
    lora_cfg = checkpoint_lora(ckpt, slot, stored_meta)
    keep = lora == "keep" and lora_cfg is not None
    cfg, abstract = abstract_model(slot, hf_config, dtype=dtype, param_dtype=param_dtype or jnp.float32,
                                   lora=lora_cfg if keep else None)
    graphdef, state = nnx.split(abstract)
    flat_state = nnx.to_flat_state(state)
    from glm_jax.lora import adapter_pairs, is_adapter_key
    target = {}
    for path, var in flat_state:
        p = ".".join(str(x) for x in path)
        if p not in stored_meta:
            raise ValueError(f"{params_dir}: parameter {p!r} missing from the checkpoint")
        m = stored_meta[p]
        want_shape = var.get_value().shape
        if tuple(m.shape) != tuple(want_shape):
            raise ValueError(f"{params_dir}: parameter {p!r} has shape {tuple(m.shape)}, the config expects "
                             f"{tuple(want_shape)}")
        dt = m.dtype if (param_dtype is None or is_adapter_key(p)) else param_dtype
        sds = jax.ShapeDtypeStruct(want_shape, dt)
        if shardings is not None:
            sds = jax.ShapeDtypeStruct(want_shape, dt, sharding=shardings(p, sds))
        target[p] = sds
    pairs = adapter_pairs(k for k in stored_meta if is_adapter_key(k)) if lora_cfg is not None else {}
    if keep:
        extra = sorted(k for k in stored_meta if is_adapter_key(k) and k not in target)
        if extra:
            raise ValueError(f"{params_dir}: LoRA key {extra[0]!r} is not on a target "
                             f"{list(lora_cfg.targets)} of the manifest entry")
    for base, keys in pairs.items():
        if (base + ".kernel") not in target:
            raise ValueError(f"{params_dir}: LoRA key {keys[0]!r} adapts {base + '.kernel'!r}, which the model "
                             f"does not have")
        for k in keys:
            if k not in target:
                m = stored_meta[k]
                kernel_sharding = target[base + ".kernel"].sharding if shardings is not None else None
                target[k] = jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=_replicated(kernel_sharding)
                                                 if kernel_sharding is not None else None)
    stored = load_params(params_dir, target)
    if not keep:
        for base, (ka, kb) in pairs.items():
            stored[base + ".kernel"] = _merged_kernel(stored[base + ".kernel"], stored.pop(ka), stored.pop(kb),
                                                      lora_cfg.scale)
    for path, var in flat_state:
        var.set_value(jnp.asarray(stored[".".join(str(x) for x in path)]))
    model = nnx.merge(graphdef, nnx.from_flat_state(flat_state))
    return cfg, model
