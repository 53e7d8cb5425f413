"""Meshes, logical-axis rules and the sharded, jitted GRPO update steps.

    mesh = make_mesh({"data": -1, "fsdp": 2, "tensor": 1})          # -1 fills the rest of the devices
    ts = shard_train_state(ts, mesh)                                 # params, frozen, optimizer state, step, rng
    step = ShardedUpdate("dit", dit_spec, mesh, ts)                  # jitted with in/out shardings, donated
    ts, metrics = step.train_on_rollout(ts, batch, num_iterations, ref_params)

**Mesh.** Three named axes: `data` (pure data parallelism: params replicated), `fsdp` (data parallelism with
params, gradients and optimizer state split over its devices, gathered per layer when used) and `tensor` (the
heads / MLP / vocab dimensions of the weights split, the activations too). `make_mesh` builds it from the config
section `mesh` (`data`, `fsdp`, `tensor`; one of them may be -1 = the remaining devices).

**Rules.** Every parameter carries one logical axis name per dimension (`glm_jax.models.layers`). `LOGICAL_RULES`
maps each logical name to mesh axes (maxtext style): `embed -> fsdp`, `heads`, `kv_heads`, `mlp`, `vocab ->
tensor`, `batch -> (data, fsdp)`; all other names are replicated. A dimension is sharded over its mesh axes only
when its size is a multiple of their product; otherwise the longest prefix of those mesh axes that divides it is
used (down to none: replicated), so odd sizes never fail. A mesh axis is used at most once per array, and axes of
size 1 are dropped. The same rules apply to every tree that holds `nnx.Param`s: params, frozen params, optax
states (they mirror the params tree, `Param` metadata included), EMA and reference copies.

**Fused kernels.** Some kernels concatenate several outputs along one logical axis: the AR's `gate_up_proj`
(`[gate | up]` on `mlp`). Splitting that dimension over `tensor` would put gate and up on different devices and
force a transfer before `up * act(gate)`; `FUSED_AXES` lists such parameters (path pattern, logical axis), and
their fused axis is never sharded over `tensor` (it stays sharded over the other rules, e.g. `embed -> fsdp`).
The result is the same either way (the partitioner keeps the math exact); the rule only avoids the transfer.

**Batches.** `batch_shardings` splits the leading (sample) dimension of an `ArBatch` / `DitBatch` over
`(data, fsdp)` (the M-RoPE `position_ids` / `decode_positions` `[3, B, ...]` on their second dimension; the flow
schedule and scalars replicated). With several processes, each contributes its own rows (`host_to_global`).

**Activations.** `constrain(x, logical_axes)` pins a large activation by logical names (`ACTIVATION_RULES`: the
model width of an activation never takes `fsdp`, which carries the samples), so FSDP weights are gathered layer
by layer instead of the partitioner carrying their layout into the activations. It applies while a mesh is set:
`ShardedUpdate` and `sharded_jit` trace under `jax.set_mesh(mesh)`.

Results are the same on every mesh up to float32 reduction order (tested on 1 device, data=8, fsdp=8,
data=2 x fsdp=4 and data=2 x fsdp=2 x tensor=2).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
# the other fields of the config's `mesh` section (not axis sizes)
MESH_OPTIONS = ("gather_decode", "gather_dit", "gather_frozen", "gather_trained")

MeshAxes = str | tuple[str, ...] | None
Rules = tuple[tuple[str, MeshAxes], ...]

LOGICAL_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("qkv", None),            # the AR vision tower's fused q|k|v columns (frozen, small)
    ("head_dim", None),
    ("length", None),
    ("time", None),
    ("cond", None),
    ("latent", None),
    ("codebook", None),
    ("norm", None),
    ("conv_h", None),
    ("conv_w", None),
    ("conv_in", None),
    ("conv_out", None),
)

FUSED_AXES: tuple[tuple[str, str], ...] = (
    (r"(^|\.)gate_up_proj\.(kernel|bias|lora_b)$", "mlp"),
)


# --------------------------------------------------------------------------------------------------- mesh


def mesh_shape(mesh_cfg: Mapping[str, int], n_devices: int) -> dict[str, int]:
    """`{data, fsdp, tensor}` sizes from the config section (one `-1` fills the rest; the `MESH_OPTIONS` fields
    are skipped); a one-line error naming the field when the sizes do not fit `n_devices`."""
    cfg = {k: v for k, v in dict(mesh_cfg).items() if k not in MESH_OPTIONS}
    unknown = sorted(set(cfg) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"mesh.{unknown[0]}: unknown mesh axis (expected {', '.join(MESH_AXES)})")
    sizes = {a: int(cfg.get(a, 1)) for a in MESH_AXES}
    fill = [a for a, n in sizes.items() if n == -1]
    bad = [a for a, n in sizes.items() if n == 0 or n < -1]
    if bad:
        raise ValueError(f"mesh.{bad[0]}={sizes[bad[0]]}: mesh sizes must be positive or -1")
    if len(fill) > 1:
        raise ValueError(f"mesh.{fill[1]}=-1: only one mesh axis may be -1 (mesh.{fill[0]} is already)")
    fixed = math.prod(n for n in sizes.values() if n != -1)
    desc = " x ".join(f"{a}={n}" for a, n in sizes.items())
    if n_devices % fixed or (not fill and fixed != n_devices):
        field = next((a for a in reversed(MESH_AXES) if sizes[a] not in (1, -1)), MESH_AXES[0])
        raise ValueError(f"mesh.{field}={sizes[field]}: the mesh {desc} does not fit the {n_devices} devices")
    if fill:
        sizes[fill[0]] = n_devices // fixed
    return sizes


def make_mesh(mesh_cfg: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A `Mesh` with axes `(data, fsdp, tensor)` over `devices` (default: all devices of all processes), laid out
    by `jax.make_mesh` so that the fastest-varying axis (`tensor`) stays within a host."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_shape(mesh_cfg, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def make_rules(overrides: Mapping[str, MeshAxes] | None = None, base: Rules = LOGICAL_RULES) -> Rules:
    """`base` with some logical names remapped (e.g. `{"embed": None}` to replicate instead of FSDP, or
    `{"mlp": ("fsdp", "tensor")}`); new names are appended."""
    out = dict(base)
    for k, v in (overrides or {}).items():
        out[k] = tuple(v) if isinstance(v, list) else v
    return tuple(out.items())


# ----------------------------------------------------------------------------------------- logical -> spec


def _mesh_axes(target: MeshAxes) -> tuple[str, ...]:
    if target is None:
        return ()
    return (target,) if isinstance(target, str) else tuple(target)


def logical_spec(axes: Sequence[str | None], shape: Sequence[int], mesh, rules: Rules = LOGICAL_RULES,
                 unsplit: Mapping[str, tuple[str, ...]] | None = None) -> PartitionSpec:
    """The `PartitionSpec` of an array with logical `axes` and `shape` on `mesh` (a `Mesh` or `AbstractMesh`).

    Each dimension takes the mesh axes its name maps to, as far as the dimension stays divisible (longest
    divisible prefix), skipping axes of size 1 and axes already used by an earlier dimension. `unsplit` maps a
    logical name to mesh axes it must not use (fused kernels)."""
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {tuple(axes)} do not match shape {tuple(shape)}")
    table = dict(rules)
    sizes = dict(mesh.shape)
    used: set[str] = set()
    out: list[MeshAxes] = []
    for name, dim in zip(axes, shape):
        chosen: list[str] = []
        prod = 1
        banned = (unsplit or {}).get(name, ()) if name is not None else ()
        for a in _mesh_axes(table.get(name) if name is not None else None):
            if a not in sizes:
                raise ValueError(f"sharding rule {name!r} -> {a!r}: the mesh has no axis {a!r} "
                                 f"(axes: {tuple(sizes)})")
            if a in used or a in banned or sizes[a] == 1:
                continue
            if dim % (prod * sizes[a]):
                break
            chosen.append(a)
            prod *= sizes[a]
        used.update(chosen)
        out.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
    while out and out[-1] is None:
        out.pop()
    return PartitionSpec(*out)


def _key_name(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def path_str(path: tuple) -> str:
    """A jax key path as a dotted string (`ar.params.text.layers.0.mlp.gate_up_proj.kernel`)."""
    return ".".join(_key_name(k) for k in path)


def _unsplit_for(path: str, fused: tuple[tuple[str, str], ...]) -> dict[str, tuple[str, ...]]:
    out: dict[str, tuple[str, ...]] = {}
    for pattern, name in fused:
        if re.search(pattern, path):
            out[name] = ("tensor",)
    return out


def variable_axes(var: nnx.Variable) -> tuple | None:
    """The logical `axes` metadata of an `nnx.Variable`, or None."""
    meta = var.get_metadata() if hasattr(var, "get_metadata") else {}
    axes = meta.get("axes")
    return None if axes is None else tuple(axes)


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def replicated(mesh: Mesh) -> NamedSharding:
    """The fully replicated sharding on `mesh`."""
    return NamedSharding(mesh, PartitionSpec())


def tree_shardings(tree: Any, mesh: Mesh, rules: Rules = LOGICAL_RULES,
                   fused: tuple[tuple[str, str], ...] = FUSED_AXES) -> Any:
    """A sharding prefix tree for any pytree holding `nnx.Variable`s (params, frozen params, optax states that
    mirror them, EMA / reference copies, a whole `TrainState`), concrete or abstract: each Variable with `axes`
    metadata gets its rule-based `NamedSharding`; every other leaf (counts, steps, keys) is replicated. An
    `nnx.Module` is read through `nnx.state`."""
    if isinstance(tree, nnx.Module):
        tree = nnx.state(tree)
    rep = replicated(mesh)

    def leaf(path, x):
        return NamedSharding(mesh, _var_spec(path, x, mesh, rules, fused)) if _is_var(x) else rep

    return jax.tree_util.tree_map_with_path(leaf, tree, is_leaf=_is_var)


def _var_spec(path, var: nnx.Variable, mesh, rules: Rules, fused: tuple[tuple[str, str], ...]) -> PartitionSpec:
    """The rule `PartitionSpec` of one Variable at `path` (replicated without matching `axes` metadata)."""
    axes, shape = variable_axes(var), tuple(getattr(var.get_value(), "shape", ()))
    if axes is None or len(axes) != len(shape):
        return PartitionSpec()
    return logical_spec(axes, shape, mesh, rules, _unsplit_for(path_str(path), fused))


def param_shardings(state_or_abstract: Any, mesh: Mesh, rules: Rules = LOGICAL_RULES) -> Any:
    """Shardings of a module's parameters (an `nnx.Module`, an `nnx.State`, or an abstract one from
    `nnx.eval_shape`), following each `nnx.Param`'s logical `axes` and `rules` (see `tree_shardings`)."""
    return tree_shardings(state_or_abstract, mesh, rules)


def train_state_shardings(ts: Any, mesh: Mesh, rules: Rules = LOGICAL_RULES) -> Any:
    """Shardings of a `train_step.TrainState` (params, frozen, optimizer state by the rules; step and RNG
    replicated)."""
    return tree_shardings(ts, mesh, rules)


# ------------------------------------------------------------------------------------------------ placing


def _put(x, sharding: NamedSharding):
    if x is None:
        return None
    if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
    if isinstance(x, jax.Array):
        if x.sharding == sharding:
            return x
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            spec = PartitionSpec(*sharding.spec, *([None] * (x.ndim + 1 - len(sharding.spec))))
            data = _put(jax.random.key_data(x), NamedSharding(sharding.mesh, spec))
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
        if sharding.is_fully_addressable or not x.is_fully_addressable:
            return jax.device_put(x, sharding)
    if sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    host = np.asarray(x)   # multi-process: every process passes the same value
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def place(tree: Any, shardings: Any) -> Any:
    """`tree` with every array put on its sharding from the prefix tree `shardings` (no copy where it already
    is). Works with several processes when every process passes the same host value (a replicated start)."""
    return jax.tree.map(lambda s, sub: jax.tree.map(lambda x: _put(x, s), sub), shardings, tree)


def shard_train_state(ts: Any, mesh: Mesh, rules: Rules = LOGICAL_RULES) -> Any:
    """The `TrainState` placed on `mesh` by the rules (see `train_state_shardings`)."""
    return place(ts, train_state_shardings(ts, mesh, rules))


def abstract_sharded(tree: Any, shardings: Any) -> Any:
    """`jax.ShapeDtypeStruct`s with shardings for `tree` (e.g. the target of a checkpoint restore)."""
    def one(s, sub):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), sub)
    return jax.tree.map(one, shardings, tree)


# ------------------------------------------------------------------------------------------------ batches

# Batch-dimension position of named fields (default 0); None = replicated.
_BATCH_AXIS = {"position_ids": 1, "decode_positions": 1, "sched": None, "noise_level": None}


def _walk_batch(fn: Callable, batch: Any) -> Any:
    """Applies `fn(array, batch_axis)` to every array of a batch tree (`_BATCH_AXIS` names the exceptions)."""

    def walk(x, axis):
        if x is None:
            return None
        if isinstance(x, tuple) and hasattr(x, "_fields"):
            return type(x)(*[walk(getattr(x, f), _BATCH_AXIS.get(f, axis)) for f in x._fields])
        if isinstance(x, (list, tuple)):
            return type(x)(walk(v, axis) for v in x)
        if isinstance(x, Mapping):
            return {k: walk(v, axis) for k, v in x.items()}
        return fn(x, axis)

    return walk(batch, 0)


def batch_spec(shape: Sequence[int], axis: int | None, mesh, rules: Rules = LOGICAL_RULES) -> PartitionSpec:
    """Spec of an array whose dimension `axis` is the sample dimension (logical `batch`); None: replicated."""
    if axis is None or len(shape) <= axis:
        return PartitionSpec()
    names = [None] * len(shape)
    names[axis] = "batch"
    return logical_spec(names, shape, mesh, rules)


def batch_shardings(batch: Any, mesh: Mesh, rules: Rules = LOGICAL_RULES) -> Any:
    """Shardings of an `ArBatch` / `DitBatch` (or any NamedTuple tree of per-sample arrays): the sample
    dimension over `(data, fsdp)` where it divides, `position_ids` / `decode_positions` on their second
    dimension, the flow schedule and scalars replicated. None fields stay None."""
    return _walk_batch(lambda x, axis: NamedSharding(mesh, batch_spec(np.shape(x), axis, mesh, rules)), batch)


def shard_batch(batch: Any, mesh: Mesh, rules: Rules = LOGICAL_RULES) -> Any:
    """`batch` placed by `batch_shardings` (one process, or the same full batch on every process)."""
    return place(batch, batch_shardings(batch, mesh, rules))


def select_rows(batch: Any, rows: slice) -> Any:
    """The samples `rows` of a batch tree (per-sample arrays cut on their sample dimension, replicated fields
    kept whole), e.g. this process's share `distributed.process_rows(B)` of a global batch."""
    def cut(x, axis):
        if axis is None or np.ndim(x) <= axis:
            return x
        return x[(slice(None),) * axis + (rows,)]
    return _walk_batch(cut, batch)


def host_to_global(local: Any, mesh: Mesh, rules: Rules = LOGICAL_RULES) -> Any:
    """Global sharded arrays from each process's own rows: `local` holds this process's `B / num_processes`
    samples of every per-sample array (replicated fields: the same full value everywhere). Uses
    `jax.make_array_from_process_local_data`; with one process it is `shard_batch`."""
    if jax.process_count() == 1:
        return shard_batch(local, mesh, rules)
    n = jax.process_count()

    def one(x, axis):
        arr = np.asarray(x)
        if axis is None or arr.ndim <= axis:
            return _put(arr, replicated(mesh))
        shape = list(arr.shape)
        shape[axis] *= n
        sharding = NamedSharding(mesh, batch_spec(shape, axis, mesh, rules))
        return jax.make_array_from_process_local_data(sharding, arr, tuple(shape))

    return _walk_batch(one, local)


# KV cache `[B, kv_heads, S, head_dim]` per layer and its validity mask `[B, S]`.
_CACHE_AXES = {"k": ("batch", "kv_heads", "length", "head_dim"), "v": ("batch", "kv_heads", "length", "head_dim"),
               "valid": ("batch", "length")}


def kv_cache_shardings(cache: Any, mesh: Mesh, rules: Rules = LOGICAL_RULES) -> Any:
    """Shardings of an AR `KVCache(k, v, valid)`: samples over `(data, fsdp)`, KV heads over `tensor`."""
    out = {}
    for field in cache._fields:
        names = _CACHE_AXES[field]
        out[field] = jax.tree.map(lambda x, n=names: NamedSharding(mesh, logical_spec(n, np.shape(x), mesh, rules)),
                                  getattr(cache, field))
    return type(cache)(**out)


# Activations: the model width is never split over `fsdp` (that axis carries the batch; the weights are gathered
# to the activations, not the other way round); heads / MLP / vocab still follow `tensor`.
ACTIVATION_RULES: Rules = make_rules({"embed": None})


def constrain(x: jax.Array, axes: Sequence[str | None], rules: Rules = ACTIVATION_RULES) -> jax.Array:
    """`with_sharding_constraint` by logical names for large activations inside jitted code (e.g. the residual
    stream `("batch", "length", "embed")`, q / k / v `("batch", "length", "heads", "head_dim")`), under the mesh
    that `sharded_jit` / `ShardedUpdate` (or `jax.set_mesh(mesh)`) sets while tracing; the identity when no mesh
    is set (one device). It pins the FSDP pattern (weights gathered per layer, activations split by samples)
    where the partitioner would otherwise propagate the weights' layout into the activations."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_spec(axes, x.shape, mesh, rules))


def tensor_unsplit() -> bool:
    """Inside traced code: no mesh is set, or its `tensor` axis has one device (so the activations are split by
    samples only, what `per_device` needs)."""
    mesh = jax.sharding.get_abstract_mesh()
    return mesh.empty or dict(mesh.shape).get("tensor", 1) == 1


def per_device(fn: Callable, args: Sequence[jax.Array], batched: Sequence[bool], outs: Sequence[str]) -> tuple:
    """`fn(*args)` (a tuple of outputs) with a Pallas call inside, per device under a mesh: XLA does not partition
    a Pallas call (it would gather its inputs to every device and compute every sample on each), so it runs in a
    `shard_map` over the mesh axes that split the samples. `batched[i]`: whether argument `i` has the sample axis
    first (else it is replicated); `outs[i]`: "batch" (sample axis first) or "sum" (a partial sum over this
    device's samples, summed over the devices). Needs the samples to be the only split dimension of the batched
    arguments (no `tensor` split); the identity without a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size <= 1:
        return fn(*args)
    b = next(a.shape[0] for a, is_b in zip(args, batched) if is_b)
    axes = logical_spec(("batch",), (b,), mesh, ACTIVATION_RULES)[0]
    names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)

    def spec(ndim, is_b):
        return PartitionSpec(axes, *[None] * (ndim - 1)) if is_b else PartitionSpec(*[None] * ndim)

    def local(*a):
        res = fn(*a)
        return tuple(jax.lax.psum(r, names) if kind == "sum" and names else r for r, kind in zip(res, outs))

    in_specs = tuple(spec(a.ndim, is_b) for a, is_b in zip(args, batched))
    out_shapes = jax.eval_shape(fn, *args)
    out_specs = tuple(spec(o.ndim, kind == "batch") for o, kind in zip(out_shapes, outs))
    return jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)(*args)


def gather_weights(tree: Any) -> Any:
    """Inside jitted code under a mesh: every `nnx.Variable` of `tree` (a state, or a tuple of states)
    constrained to its rule sharding without `fsdp` (`tensor` splits kept), i.e. the FSDP weights gathered once.
    For decode loops: without it XLA's GPU compiler gathered every layer's weights again at every token (the AR
    sampler on two H100s: 54.4 s per 1024² rollout against 11.8 s with it). Costs the gathered weights' memory on
    each device. The identity when no mesh is set."""
    return constrain_weights(tree, ACTIVATION_RULES)


def shard_weights(tree: Any) -> Any:
    """Inside jitted code under a mesh: every `nnx.Variable` of `tree` constrained to the params' own rule
    sharding (with `fsdp`), e.g. gradient accumulators that must stay split while their addends are gathered.
    The identity when no mesh is set."""
    return constrain_weights(tree, LOGICAL_RULES)


def constrain_weights(tree: Any, rules: Rules) -> Any:
    """Every `nnx.Variable` of `tree` constrained to its sharding under `rules` (inside jitted code, under the
    mesh set while tracing; the identity when none is set)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return tree

    def leaf(path, x):
        if not _is_var(x):
            return x
        spec = _var_spec(path, x, mesh, rules, FUSED_AXES)
        return x.replace(jax.lax.with_sharding_constraint(x.get_value(), spec))

    return jax.tree_util.tree_map_with_path(leaf, tree, is_leaf=_is_var)


def sharded_jit(fn: Callable, mesh: Mesh, *, in_shardings: Any = None, out_shardings: Any = None,
                donate_argnums: int | tuple[int, ...] = ()) -> Callable:
    """`jax.jit(fn, in_shardings=..., out_shardings=..., donate_argnums=...)` called (and so traced) under
    `jax.set_mesh(mesh)`, so that `constrain` calls inside `fn` apply (None: left to the partitioner). The
    jitted function is `.jitted`."""
    kw = {k: v for k, v in (("in_shardings", in_shardings), ("out_shardings", out_shardings)) if v is not None}
    jitted = jax.jit(fn, donate_argnums=donate_argnums, **kw)

    def call(*args):
        with jax.set_mesh(mesh):
            return jitted(*args)

    call.jitted = jitted
    return call


# ------------------------------------------------------------------------------------------ update steps


def _cache_key(tree) -> tuple:
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple(leaves)


class ShardedUpdate:
    """The GRPO update of one component (`"ar"` or `"dit"`) jitted over `mesh` with explicit shardings.

    `ts` (concrete or abstract) fixes the train-state shardings (`train_state_shardings`); batch and reference
    shardings follow each call's shapes (`batch_shardings`, `tree_shardings`), one compilation per distinct
    layout. Traced under the mesh (`sharded_jit`), so `constrain` calls in the models apply. The state is donated; outputs keep the input shardings and the metrics are replicated. The methods
    mirror `train_step.*_update_jit`, `*_old_logprobs_jit` and `*_train_on_rollout`.
    """

    def __init__(self, part: str, spec, mesh: Mesh, ts: Any, rules: Rules = LOGICAL_RULES):
        from glm_jax.grpo import train_step as T
        if part not in ("ar", "dit"):
            raise ValueError(f"ShardedUpdate: part {part!r}; expected 'ar' or 'dit'")
        self.part, self.spec, self.mesh, self.rules = part, spec, mesh, rules
        self._step = T.ar_update_step if part == "ar" else T.dit_update_step
        self._old = T.ar_old_logprobs if part == "ar" else T.dit_old_logprobs
        self.ts_shardings = train_state_shardings(ts, mesh, rules)
        self._jits: dict = {}

    def _fn(self, kind: str, batch_sh, ref_sh, batch) -> Callable:
        key = (kind, _cache_key(batch_sh), _cache_key(ref_sh))
        fn = self._jits.get(key)
        if fn is not None:
            return fn
        spec, step, old = self.spec, self._step, self._old
        rep = replicated(self.mesh)
        if kind == "old":
            rows = batch.tokens if self.part == "ar" else batch.steps
            out = NamedSharding(self.mesh, batch_spec(np.shape(rows), 0, self.mesh, self.rules))
            fn = sharded_jit(lambda ts, b: old(spec, ts, b), self.mesh, in_shardings=(self.ts_shardings, batch_sh),
                             out_shardings=out)
        elif ref_sh is None:
            fn = sharded_jit(lambda ts, b: step(spec, ts, b), self.mesh, in_shardings=(self.ts_shardings, batch_sh),
                             out_shardings=(self.ts_shardings, rep), donate_argnums=0)
        else:
            fn = sharded_jit(lambda ts, b, r: step(spec, ts, b, r), self.mesh,
                             in_shardings=(self.ts_shardings, batch_sh, ref_sh),
                             out_shardings=(self.ts_shardings, rep), donate_argnums=0)
        self._jits[key] = fn
        return fn

    def update(self, ts, batch, ref_params=None):
        """One optimizer step (`train_step.*_update_step`): returns `(ts, metrics)`; `ts` is donated."""
        batch_sh = batch_shardings(batch, self.mesh, self.rules)
        ts, batch = place(ts, self.ts_shardings), place(batch, batch_sh)
        if ref_params is None:
            return self._fn("update", batch_sh, None, batch)(ts, batch)
        ref_sh = tree_shardings(ref_params, self.mesh, self.rules)
        return self._fn("update", batch_sh, ref_sh, batch)(ts, batch, place(ref_params, ref_sh))

    def old_logprobs(self, ts, batch) -> jax.Array:
        """The trainer's log-probs of `batch` under the current params (`train_step.*_old_logprobs`)."""
        batch_sh = batch_shardings(batch, self.mesh, self.rules)
        ts, batch = place(ts, self.ts_shardings), place(batch, batch_sh)
        return self._fn("old", batch_sh, None, batch)(ts, batch)

    def train_on_rollout(self, ts, batch, num_iterations: int = 1, ref_params=None):
        """`num_iterations` inner epochs on one rollout batch (as `train_step.*_train_on_rollout`); returns
        `(ts, [metrics per epoch])`."""
        if num_iterations > 1:
            batch = batch._replace(old_logprobs=self.old_logprobs(ts, batch))
        out = []
        for _ in range(num_iterations):
            ts, metrics = self.update(ts, batch, ref_params)
            out.append(metrics)
        return ts, out


def describe(shardings: Any) -> dict[str, str]:
    """`{dotted path: partition spec}` of a sharding tree, e.g. for logging the layout at start-up."""
    flat = jax.tree_util.tree_flatten_with_path(shardings)[0]
    return {path_str(p): str(s.spec) for p, s in flat}
