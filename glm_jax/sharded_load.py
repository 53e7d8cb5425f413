"""Loading weights straight into a sharded state: no process ever holds a full copy of a model it shards.

    mesh = sharding.make_mesh({"data": -1, "fsdp": 8, "tensor": 1})
    cfg, dit = load_checkpoint_sharded(ckpt, "transformer", mesh)           # a glm_jax checkpoint (orbax)
    cfg, dit = load_torch_sharded("GLM-Image/transformer", mesh)            # a PyTorch (HF / diffusers) directory

Each parameter's target `NamedSharding` comes from its logical axes and the rules (`glm_jax.sharding`).

* **glm_jax checkpoint** (`load_checkpoint_sharded`): `checkpoint.load_model` with those shardings; orbax
  restores every array straight into its sharding, each process reading the chunks of its own shards.
* **PyTorch safetensors** (`load_torch_sharded`): one component directory (`config.json` + `*.safetensors`,
  sharded with an index or not), or a pipeline directory with `slot=`. Every parameter is built with
  `jax.make_array_from_callback`: for each shard this process holds, the matching slice of the torch tensor is
  read from the memory-mapped file (through the key table's transform: LINEAR / CONV slices are the transposed
  slices of the torch layout), converted and cast; a slice shared by several local devices is read once. The
  key table's checks are the conversion's (unknown key, wrong shape, missing parameter: `ConversionError`
  naming the key and file). Pass `reads=[]` to get a record of every slice read (key, torch index, bytes).

Peak host memory is one shard of the largest parameter.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from conversion.apply import ConversionError, check_complete, path_str, resolve_key
from conversion.safetensors_io import SafetensorsFile, list_weight_files
from conversion.table import (
    CONV,
    LINEAR,
    Rule,
    torch_to_jax_array,
)
from glm_jax.sharding import FUSED_AXES, LOGICAL_RULES, Rules, _unsplit_for, logical_spec, variable_axes


@dataclass(frozen=True)
class SliceRead:
    """One read from a safetensors file: the torch key, the `(start, stop)` range per torch dimension, bytes."""

    file: str
    key: str
    index: tuple[tuple[int, int], ...]
    nbytes: int


def module_shardings(abstract: nnx.Module, mesh, rules: Rules = LOGICAL_RULES) -> dict[str, NamedSharding]:
    """`{dotted param path: NamedSharding}` of a (possibly abstract) module by its params' logical axes."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        p = path_str(path)
        shape = tuple(var.get_value().shape)
        axes = variable_axes(var)
        if axes is None or len(axes) != len(shape):
            axes = (None,) * len(shape)
        out[p] = NamedSharding(mesh, logical_spec(axes, shape, mesh, rules, _unsplit_for(p, FUSED_AXES)))
    return out


# -------------------------------------------------------------------------------------- glm_jax checkpoint


def load_checkpoint_sharded(ckpt: str, slot: str, mesh, rules: Rules = LOGICAL_RULES, *, dtype=jnp.float32,
                            param_dtype=None, lora: str = "merge") -> tuple[Any, nnx.Module]:
    """`checkpoint.load_model` restoring every parameter straight into its rule-based sharding on `mesh`
    (LoRA adapters, small, are replicated). Returns `(cfg, module)`."""
    from glm_jax.checkpoint import abstract_model, checkpoint_lora, component_config, load_model
    lora_cfg = checkpoint_lora(ckpt, slot) if lora == "keep" else None
    _, abstract = abstract_model(slot, component_config(ckpt, slot), lora=lora_cfg)
    table = module_shardings(abstract, mesh, rules)
    rep = NamedSharding(mesh, jax.sharding.PartitionSpec())
    return load_model(ckpt, slot, dtype=dtype, param_dtype=param_dtype, lora=lora,
                      shardings=lambda p, sds: table.get(p, rep))


# ------------------------------------------------------------------------------------- PyTorch safetensors


class _File:
    """A safetensors file memory-mapped for slice reads (zero-copy views; only the sliced bytes are touched)."""

    def __init__(self, path: str):
        self.path = path
        self.st = SafetensorsFile(path)
        self._fh = open(path, "rb")  # noqa: SIM115 (kept open for the mmap; closed in close())
        (n,) = struct.unpack("<Q", self._fh.read(8))
        self._data_start = 8 + n
        size = os.fstat(self._fh.fileno()).st_size
        self._mm = mmap.mmap(self._fh.fileno(), 0, access=mmap.ACCESS_READ) if size else None

    def read(self, key: str, index: tuple[slice, ...]) -> np.ndarray:
        info = self.st.info(key)
        count = int(np.prod(info.shape, dtype=np.int64))
        if count == 0:
            return np.zeros(info.shape, info.dtype)[index]
        view = np.frombuffer(self._mm, dtype=info.dtype, count=count,
                             offset=self._data_start + info.begin).reshape(info.shape)
        out = np.array(view[index])
        del view
        return out

    def close(self):
        self.st.close()
        if self._mm is not None:
            self._mm.close()
        self._fh.close()


def _torch_index(jax_index: tuple[slice, ...], transform: str) -> tuple[slice, ...]:
    """The torch-layout index of a jax-layout slice (LINEAR: transposed; CONV: HWIO -> OIHW)."""
    if transform == LINEAR:
        return (jax_index[1], jax_index[0])
    if transform == CONV:
        return (jax_index[3], jax_index[2], jax_index[0], jax_index[1])
    return tuple(jax_index)


def _ranges(index: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    return tuple(s.indices(n)[:2] for s, n in zip(index, shape))


def _component_dir(src: str, slot: str | None) -> str:
    if os.path.exists(os.path.join(src, "model_index.json")):
        if slot is None:
            raise ConversionError(f"{src}: a pipeline directory; pass slot= (e.g. 'transformer')")
        return os.path.join(src, slot)
    return src


def _index_tensors(files: list[_File], rules: list[Rule], expected: dict[str, tuple], ignore: set[str],
                   source: str) -> dict[str, tuple[_File, str, Rule]]:
    """`{jax path: (file, torch key, rule)}` with the conversion's checks (unknown key, shape, duplicate,
    missing), from the headers only."""
    out: dict[str, tuple[_File, str, Rule]] = {}
    for f in files:
        for key in f.st.keys():  # noqa: SIM118 (SafetensorsFile is not a dict)
            if key in ignore:
                continue
            path, rule = resolve_key(rules, key, f.st.info(key).shape, expected, out, f.path)
            out[path] = (f, key, rule)
    check_complete(rules, expected, out, source)
    return out


def load_torch_sharded(src: str, mesh, rules: Rules = LOGICAL_RULES, *, slot: str | None = None,
                       dtype=jnp.float32, param_dtype=None, reads: list | None = None
                       ) -> tuple[Any, nnx.Module]:
    """Builds a component from a PyTorch (HF / diffusers) directory with every parameter placed on its
    rule-based sharding, each process reading only the slices of its own shards. `param_dtype=None` keeps the
    stored dtypes; `reads` (a list) receives a `SliceRead` per slice read. Returns `(cfg, module)`."""
    from glm_jax.checkpoint import abstract_model
    from glm_jax.components import detect_component, read_json
    src = _component_dir(os.path.abspath(src), slot)
    cfg_path = os.path.join(src, "config.json")
    spec = detect_component(read_json(cfg_path), cfg_path)
    cfg, abstract = abstract_model(spec.slot, read_json(cfg_path), dtype=dtype,
                                   param_dtype=param_dtype or jnp.float32)
    shardings = module_shardings(abstract, mesh, rules)
    graphdef, state = nnx.split(abstract)
    flat = nnx.to_flat_state(state)
    expected = {path_str(p): tuple(v.get_value().shape) for p, v in flat}
    files = [_File(p) for p in list_weight_files(src)]
    try:
        table = _index_tensors(files, spec.rules(), expected, set(spec.ignore_on_import()), src)
        for path, var in flat:
            p = path_str(path)
            f, key, rule = table[p]
            info = f.st.info(key)
            target = np.dtype(param_dtype) if param_dtype is not None else info.dtype
            done: dict = {}

            def shard(index, f=f, key=key, rule=rule, info=info, target=target, done=done):
                tidx = _torch_index(tuple(index), rule.transform)
                rng = _ranges(tidx, info.shape)
                if rng not in done:
                    x = f.read(key, tuple(slice(a, b) for a, b in rng))
                    if reads is not None:
                        reads.append(SliceRead(f.path, key, rng, int(x.nbytes)))
                    done[rng] = torch_to_jax_array(x, rule.transform).astype(target)
                return done[rng]

            var.set_value(jax.make_array_from_callback(expected[p], shardings[p], shard))
    finally:
        for f in files:
            f.close()
    return cfg, nnx.merge(graphdef, nnx.from_flat_state(flat))
