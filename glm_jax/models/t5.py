"""T5 encoder (ByT5 geometry) used by GLM-Image to embed the quoted "glyph" texts of a prompt.

Mirrors transformers' `T5EncoderModel` (`models/t5/modeling_t5.py`), encoder stack only:

    x = shared[ids]
    per block: x += o(attn(T5LN(x)))     no 1/sqrt(d) scaling; scores += relative position bias + padding mask
               x += wo(act(wi_0 T5LN(x)) * wi_1 T5LN(x))     (gated) or wo(act(wi T5LN(x)))
    out = final_layer_norm(x)

Quirks kept on purpose:
* Only block 0 owns `relative_attention_bias` (buckets x heads); its bias is computed once and reused by every
  block. Buckets are bidirectional (half of them for keys to the right), exact below `num_buckets // 4`,
  logarithmic up to `max_distance`, clipped beyond. They depend only on the (static) sequence length, so they are
  computed on the host with the same float32 arithmetic as torch.
* T5LayerNorm is RMSNorm without mean or bias; the variance is accumulated in float32, the normalised value is
  cast to the compute dtype before the weight multiply (as transformers does for half-precision weights).
* transformers keeps `wo` in float32 (`_keep_in_fp32_modules = ["wo"]`) when a checkpoint is loaded in bf16/fp16,
  so the FF output and, from block 0's FF onward, the residual stream are float32. Here `wo` is stored and applied
  in float32 whatever `param_dtype` is, which reproduces that promotion.

Parameter paths follow the torch names (`shared.embedding`, `encoder.block.{i}.layer.0.SelfAttention.q.kernel`,
`encoder.block.{i}.layer.1.DenseReluDense.wi_0.kernel`, `encoder.final_layer_norm.weight`) so that the key table in
`conversion/tables/t5.py` is a plain rename plus transposes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from glm_jax.models.layers import Dense, DType, Embedding, param

# Activation names as transformers' ACT2FN spells them (the part of `feed_forward_proj` after "gated-").
_ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
}


@dataclass(frozen=True)
class T5Config:
    """Encoder sizes read from a transformers T5 `config.json`."""

    vocab_size: int
    d_model: int
    d_kv: int
    d_ff: int
    num_layers: int
    num_heads: int
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    dense_act_fn: str = "gelu_new"
    is_gated_act: bool = True

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.d_kv

    @classmethod
    def from_hf(cls, d: dict) -> T5Config:
        """Reads a transformers `T5Config` dict; `feed_forward_proj` is parsed as transformers does.

        `"gated-gelu"` means gated `gelu_new` (tanh approximation, a backwards-compatibility rule of transformers);
        `"gated-X"` / `"X"` use activation X. Unknown activations raise a `ValueError` naming the field.
        """
        proj = d.get("feed_forward_proj", "relu")
        parts = proj.split("-")
        if (len(parts) > 1 and parts[0] != "gated") or len(parts) > 2:
            raise ValueError(f"config.json: feed_forward_proj={proj!r} is not 'gated-ACT' or 'ACT'")
        act = "gelu_new" if proj == "gated-gelu" else parts[-1]
        if act not in _ACTIVATIONS:
            raise ValueError(f"config.json: feed_forward_proj={proj!r}: activation {act!r} is not supported "
                             f"(supported: {sorted(_ACTIVATIONS)})")
        return cls(vocab_size=int(d["vocab_size"]), d_model=int(d["d_model"]), d_kv=int(d["d_kv"]),
                   d_ff=int(d["d_ff"]), num_layers=int(d["num_layers"]), num_heads=int(d["num_heads"]),
                   relative_attention_num_buckets=int(d.get("relative_attention_num_buckets", 32)),
                   relative_attention_max_distance=int(d.get("relative_attention_max_distance", 128)),
                   layer_norm_epsilon=float(d.get("layer_norm_epsilon", 1e-6)),
                   dense_act_fn=act, is_gated_act=parts[0] == "gated")


@lru_cache(maxsize=64)
def relative_position_buckets(q_len: int, k_len: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """Bidirectional T5 bucket index `[q_len, k_len]` of `key_pos - query_pos` (host-side, int32).

    Half of the buckets are for positive offsets (keys to the right). Within a half, offsets below
    `num_buckets // 4` get their own bucket; larger ones are binned logarithmically up to `max_distance`,
    beyond which they share the last bucket. The log is evaluated in float32 and truncated toward zero, exactly
    the arithmetic transformers uses, so the bucket boundaries agree.
    """
    rel = np.arange(k_len, dtype=np.int64)[None, :] - np.arange(q_len, dtype=np.int64)[:, None]
    half = num_buckets // 2
    out = (rel > 0).astype(np.int64) * half
    dist = np.abs(rel)
    max_exact = half // 2
    with np.errstate(divide="ignore"):
        scaled = (np.log(dist.astype(np.float32) / np.float32(max_exact))
                  / np.float32(math.log(max_distance / max_exact)) * np.float32(half - max_exact))
    large = max_exact + np.where(dist < max_exact, 0, scaled).astype(np.int64)  # dist < max_exact: unused
    large = np.minimum(large, half - 1)
    return (out + np.where(dist < max_exact, dist, large)).astype(np.int32)


class T5LayerNorm(nnx.Module):
    """RMSNorm without mean/bias: variance in float32, normalised value cast to `dtype`, then scaled."""

    def __init__(self, dim: int, *, eps: float, dtype: DType, param_dtype: DType, rngs: nnx.Rngs):
        self.eps, self.dtype = eps, dtype
        self.weight = param(rngs, (dim,), ("embed",), param_dtype, jax.nn.initializers.ones)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(self.dtype) * y.astype(self.dtype)


class T5Attention(nnx.Module):
    """Bidirectional self-attention without score scaling; block 0 also owns the relative position bias table."""

    def __init__(self, cfg: T5Config, *, has_relative_bias: bool, dtype: DType, param_dtype: DType,
                 rngs: nnx.Rngs):
        self.cfg, self.dtype = cfg, dtype
        kw = {"use_bias": False, "dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        self.q = Dense(cfg.d_model, cfg.inner_dim, axes=("embed", "heads"), **kw)
        self.k = Dense(cfg.d_model, cfg.inner_dim, axes=("embed", "heads"), **kw)
        self.v = Dense(cfg.d_model, cfg.inner_dim, axes=("embed", "heads"), **kw)
        self.o = Dense(cfg.inner_dim, cfg.d_model, axes=("heads", "embed"), **kw)
        self.relative_attention_bias = (
            Embedding(cfg.relative_attention_num_buckets, cfg.num_heads, axes=(None, "heads"), dtype=dtype,
                      param_dtype=param_dtype, rngs=rngs) if has_relative_bias else None)

    def position_bias(self, length: int) -> jax.Array:
        """`[1, heads, length, length]` relative position bias (needs the table of block 0)."""
        buckets = relative_position_buckets(length, length, self.cfg.relative_attention_num_buckets,
                                            self.cfg.relative_attention_max_distance)
        values_SSN = self.relative_attention_bias(jnp.asarray(buckets))
        return jnp.transpose(values_SSN, (2, 0, 1))[None]

    def __call__(self, x_BSD: jax.Array, bias_1NSS: jax.Array, mask_BS: jax.Array) -> jax.Array:
        B, S, _ = x_BSD.shape
        shape = (B, S, self.cfg.num_heads, self.cfg.d_kv)
        q_BSNH = self.q(x_BSD).reshape(shape)
        k_BSNH = self.k(x_BSD).reshape(shape)
        v_BSNH = self.v(x_BSD).reshape(shape)
        out_BSNH = jax.nn.dot_product_attention(q_BSNH, k_BSNH, v_BSNH, bias=bias_1NSS.astype(self.dtype),
                                                mask=mask_BS[:, None, None, :], scale=1.0)
        return self.o(out_BSNH.reshape(B, S, self.cfg.inner_dim))


class T5LayerSelfAttention(nnx.Module):
    """Pre-norm residual self-attention (`layer.0` of a block)."""

    def __init__(self, cfg: T5Config, *, has_relative_bias: bool, dtype: DType, param_dtype: DType,
                 rngs: nnx.Rngs):
        self.SelfAttention = T5Attention(cfg, has_relative_bias=has_relative_bias, dtype=dtype,
                                         param_dtype=param_dtype, rngs=rngs)
        self.layer_norm = T5LayerNorm(cfg.d_model, eps=cfg.layer_norm_epsilon, dtype=dtype,
                                      param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x_BSD: jax.Array, bias_1NSS: jax.Array, mask_BS: jax.Array) -> jax.Array:
        return x_BSD + self.SelfAttention(self.layer_norm(x_BSD), bias_1NSS, mask_BS)


class T5DenseReluDense(nnx.Module):
    """FF `wo(act(wi_0 x) * wi_1 x)` (gated) or `wo(act(wi x))`; `wo` is float32 (see module docstring)."""

    def __init__(self, cfg: T5Config, *, dtype: DType, param_dtype: DType, rngs: nnx.Rngs):
        self.act_name, self.gated = cfg.dense_act_fn, cfg.is_gated_act
        kw = {"use_bias": False, "dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        if cfg.is_gated_act:
            self.wi_0 = Dense(cfg.d_model, cfg.d_ff, axes=("embed", "mlp"), **kw)
            self.wi_1 = Dense(cfg.d_model, cfg.d_ff, axes=("embed", "mlp"), **kw)
        else:
            self.wi = Dense(cfg.d_model, cfg.d_ff, axes=("embed", "mlp"), **kw)
        self.wo = Dense(cfg.d_ff, cfg.d_model, axes=("mlp", "embed"), use_bias=False, dtype=jnp.float32,
                        param_dtype=jnp.float32, rngs=rngs)

    def __call__(self, x_BSD: jax.Array) -> jax.Array:
        act = _ACTIVATIONS[self.act_name]
        h_BSF = act(self.wi_0(x_BSD)) * self.wi_1(x_BSD) if self.gated else act(self.wi(x_BSD))
        return self.wo(h_BSF)


class T5LayerFF(nnx.Module):
    """Pre-norm residual feed-forward (`layer.1` of a block); promotes the residual to float32."""

    def __init__(self, cfg: T5Config, *, dtype: DType, param_dtype: DType, rngs: nnx.Rngs):
        self.DenseReluDense = T5DenseReluDense(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layer_norm = T5LayerNorm(cfg.d_model, eps=cfg.layer_norm_epsilon, dtype=dtype,
                                      param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x_BSD: jax.Array) -> jax.Array:
        return x_BSD + self.DenseReluDense(self.layer_norm(x_BSD))


class T5Block(nnx.Module):
    """`layer = [self-attention, feed-forward]`, as torch names them."""

    def __init__(self, cfg: T5Config, *, has_relative_bias: bool, dtype: DType, param_dtype: DType,
                 rngs: nnx.Rngs):
        self.layer = nnx.List([
            T5LayerSelfAttention(cfg, has_relative_bias=has_relative_bias, dtype=dtype, param_dtype=param_dtype,
                                 rngs=rngs),
            T5LayerFF(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs),
        ])

    def __call__(self, x_BSD: jax.Array, bias_1NSS: jax.Array, mask_BS: jax.Array) -> jax.Array:
        return self.layer[1](self.layer[0](x_BSD, bias_1NSS, mask_BS))


class T5Stack(nnx.Module):
    """The encoder blocks and the final norm (`encoder.*`); embeddings live on `T5Encoder.shared`."""

    def __init__(self, cfg: T5Config, *, dtype: DType, param_dtype: DType, rngs: nnx.Rngs):
        self.block = nnx.List([T5Block(cfg, has_relative_bias=i == 0, dtype=dtype, param_dtype=param_dtype,
                                       rngs=rngs) for i in range(cfg.num_layers)])
        self.final_layer_norm = T5LayerNorm(cfg.d_model, eps=cfg.layer_norm_epsilon, dtype=dtype,
                                            param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x_BSD: jax.Array, mask_BS: jax.Array) -> jax.Array:
        bias_1NSS = self.block[0].layer[0].SelfAttention.position_bias(x_BSD.shape[1])
        for blk in self.block:
            x_BSD = blk(x_BSD, bias_1NSS, mask_BS)
        return self.final_layer_norm(x_BSD)


class T5Encoder(nnx.Module):
    """`T5EncoderModel`: `__call__(ids [B, S], mask [B, S]) -> last_hidden_state [B, S, d_model]`.

    `mask` is 1/True for real tokens; padded keys are excluded from attention (padded query rows still produce
    values, which callers drop). The output is in the compute `dtype`.
    """

    def __init__(self, cfg: T5Config, *, dtype: DType = jnp.float32, param_dtype: DType = jnp.float32,
                 rngs: nnx.Rngs):
        self.cfg = cfg
        self.shared = Embedding(cfg.vocab_size, cfg.d_model, axes=("vocab", "embed"), dtype=dtype,
                                param_dtype=param_dtype, rngs=rngs)
        self.encoder = T5Stack(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, ids_BS: jax.Array, mask_BS: jax.Array | None = None) -> jax.Array:
        if mask_BS is None:
            mask_BS = jnp.ones(ids_BS.shape, bool)
        return self.encoder(self.shared(ids_BS), mask_BS.astype(bool))
