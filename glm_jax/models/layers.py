"""Small building blocks shared by every model: dense layers and norms whose parameters carry logical axis names.

Every parameter is an `nnx.Param` with an `axes` metadata tuple of logical names (`embed`, `heads`, `kv_heads`,
`head_dim`, `mlp`, `vocab`, ...). A model never names a mesh axis; `glm_jax.sharding` maps logical names to mesh
axes. Layers keep their own arrays (no stacked `[L, ...]` weights), see ARCHITECTURE notes in the README.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

DType = jnp.dtype | type

_default_init = jax.nn.initializers.normal(0.02)


def param(rngs: nnx.Rngs, shape: Sequence[int], axes: Sequence[str | None], dtype: DType,
          init=_default_init) -> nnx.Param:
    """A parameter of `shape` initialised by `init`, annotated with logical `axes` (one name per dimension)."""
    if len(axes) != len(shape):
        raise ValueError(f"axes {tuple(axes)} do not match shape {tuple(shape)}")
    return nnx.Param(init(rngs.params(), tuple(shape), dtype), axes=tuple(axes))


class Dense(nnx.Module):
    """`y = x @ kernel + bias` with kernel `(in, out)` (the transpose of torch's `nn.Linear.weight`).

    Compute happens in `dtype` (inputs and kernel are cast); parameters are stored in `param_dtype`.

    Optional LoRA adapters (`glm_jax.lora.add_lora` sets them): `lora_a` `(in, rank)` and `lora_b` `(rank, out)`
    add `lora_scale * (x @ lora_a) @ lora_b` (`lora_scale = alpha / rank`), also in `dtype`. Without adapters
    (`lora_a is None`) the layer is the plain matmul.
    """

    COMPUTE_CAST = ("kernel", "bias", "lora_a", "lora_b")   # used only as `.astype(self.dtype)`: see cast_for_compute

    def __init__(self, in_features: int, out_features: int, *, axes: tuple[str | None, str | None],
                 use_bias: bool = True, dtype: DType = jnp.float32, param_dtype: DType = jnp.float32,
                 rngs: nnx.Rngs):
        self.in_features, self.out_features = in_features, out_features
        self.dtype = dtype
        self.kernel = param(rngs, (in_features, out_features), axes, param_dtype)
        self.bias = (param(rngs, (out_features,), (axes[1],), param_dtype, jax.nn.initializers.zeros)
                     if use_bias else None)
        self.lora_a = self.lora_b = nnx.data(None)
        self.lora_scale = 0.0

    def __call__(self, x: jax.Array, *, bias: bool = True) -> jax.Array:
        """`x @ kernel (+ bias) (+ adapters)`; `bias=False` leaves the bias out, for a caller that applies it
        itself (`bias_value`) in a fused op."""
        x = x.astype(self.dtype)
        y = jnp.dot(x, self.kernel[...].astype(self.dtype))
        if bias and self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y + self.lora_delta(x)

    def bias_value(self) -> jax.Array:
        """The bias in the compute dtype (zeros for a layer without one)."""
        if self.bias is None:
            return jnp.zeros((self.out_features,), self.dtype)
        return self.bias[...].astype(self.dtype)

    def lora_delta(self, x: jax.Array):
        """The adapters' term `lora_scale * (x @ lora_a) @ lora_b` in `dtype` (0 without adapters)."""
        if self.lora_a is None:
            return 0
        xa = jnp.dot(x.astype(self.dtype), self.lora_a[...].astype(self.dtype))
        return jnp.dot(self.lora_scale * xa, self.lora_b[...].astype(self.dtype))


class Embedding(nnx.Module):
    """Lookup table `embedding [num, features]` (torch `nn.Embedding`), looked up in `dtype`."""

    COMPUTE_CAST = ("embedding",)   # the lookup's result is cast to `dtype`, and a cast commutes with the lookup

    def __init__(self, num: int, features: int, *, axes: tuple[str | None, str | None], dtype: DType,
                 param_dtype: DType, rngs: nnx.Rngs):
        self.dtype = dtype
        self.embedding = param(rngs, (num, features), axes, param_dtype, jax.nn.initializers.normal(1.0))

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)


def cast_for_compute(model: nnx.Module) -> nnx.Module:
    """A copy of `model` (`nnx.clone`: new variables, the arrays shared) whose layers that use their weights only
    in their compute dtype (`Dense`, `Embedding`, the AR's `Embed`: classes naming them in `COMPUTE_CAST`) hold
    them cast to that dtype where it is narrower. Every output of the model is unchanged, bit for bit (each such
    layer casts the weight as its first use); norms' scales and biases, which LayerNorm applies in float32, are
    left as they are.

    For the sampling loops of a model trained with float32 weights and bfloat16 compute (`model.param_dtype`):
    inside the jitted rollout, before `sharding.gather_weights`, it halves the bytes the FSDP gather moves and the
    gathered copy's memory, and the loop reads bfloat16 weights at every step instead of float32 ones it casts
    again."""
    model = nnx.clone(model)
    for _, module in nnx.iter_modules(model):
        dtype = getattr(module, "dtype", None)
        for name in getattr(type(module), "COMPUTE_CAST", ()):
            var = getattr(module, name, None)
            if (isinstance(var, nnx.Variable) and dtype is not None and jnp.issubdtype(var.dtype, jnp.floating)
                    and jnp.dtype(var.dtype).itemsize > jnp.dtype(dtype).itemsize):
                var.set_value(var.get_value().astype(dtype))
    return model


def rms_norm(x: jax.Array, weight: jax.Array | None, eps: float) -> jax.Array:
    """RMSNorm as transformers computes it: variance in fp32, cast back to the input dtype, then scale."""
    x32 = x.astype(jnp.float32)
    y = (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)
    return y if weight is None else weight.astype(x.dtype) * y


def ln_stats(x32: jax.Array, eps: float) -> tuple[jax.Array, jax.Array]:
    """LayerNorm statistics over the last axis (kept): `mean` and `rstd = 1 / sqrt(var + eps)`."""
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    return mean, jax.lax.rsqrt(var + eps)


def layer_norm(x: jax.Array, weight: jax.Array | None, bias: jax.Array | None, eps: float) -> jax.Array:
    """LayerNorm over the last axis, statistics in fp32, result cast to the input dtype."""
    x32 = x.astype(jnp.float32)
    mean, rstd = ln_stats(x32, eps)
    y = (x32 - mean) * rstd
    if weight is not None:
        y = y * weight.astype(jnp.float32)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(x.dtype)


class RMSNorm(nnx.Module):
    """RMSNorm with a learned scale (`weight`, axis `norm_axis`)."""

    def __init__(self, dim: int, *, eps: float, axis_name: str = "embed", param_dtype: DType = jnp.float32,
                 rngs: nnx.Rngs):
        self.eps = eps
        self.weight = param(rngs, (dim,), (axis_name,), param_dtype, jax.nn.initializers.ones)

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.weight[...], self.eps)


class LayerNorm(nnx.Module):
    """LayerNorm, optionally with affine `weight` / `bias`."""

    def __init__(self, dim: int, *, eps: float, affine: bool = True, axis_name: str = "embed",
                 param_dtype: DType = jnp.float32, rngs: nnx.Rngs):
        self.eps = eps
        if affine:
            self.weight = param(rngs, (dim,), (axis_name,), param_dtype, jax.nn.initializers.ones)
            self.bias = param(rngs, (dim,), (axis_name,), param_dtype, jax.nn.initializers.zeros)
        else:
            self.weight = self.bias = None

    def __call__(self, x: jax.Array) -> jax.Array:
        w = None if self.weight is None else self.weight[...]
        b = None if self.bias is None else self.bias[...]
        return layer_norm(x, w, b, self.eps)


def dtype_from_name(name: str | None, default: DType = jnp.float32):
    """Maps a config dtype string (`"bfloat16"`, `"float32"`, `"bf16"`, ...) to a jnp dtype."""
    if name is None:
        return default
    table = {"bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16, "float32": jnp.float32, "fp32": jnp.float32,
             "float16": jnp.float16, "fp16": jnp.float16}
    if name not in table:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(table)}")
    return table[name]
