"""GLM-Image AR model (transformers `GlmImageForConditionalGeneration`) in Flax NNX.

Module tree (jax paths mirror the torch names, see `conversion/tables/ar.py`):

    text.embed_tokens.embedding          [vocab, D]
    text.layers.{i}.input_layernorm / post_self_attn_layernorm / post_attention_layernorm / post_mlp_layernorm
    text.layers.{i}.self_attn.{q,k,v}_proj (bias), o_proj (no bias)
    text.layers.{i}.mlp.gate_up_proj (fused, gate = first half), mlp.down_proj
    text.norm
    lm_head.kernel                       [D, vision_vocab]   (not tied; only the image-code vocabulary)
    visual.*, vqmodel.*                  source-image tokenizer (ViT + VQ, `glm_jax.models.ar_vision`)

Decoder layer ("sandwich" norm, all RMSNorm with variance in fp32):

    x = x + post_self_attn_layernorm(attn(input_layernorm(x)))
    x = x + post_mlp_layernorm(mlp(post_attention_layernorm(x)))

Attention: GQA (`heads / kv_heads` query heads per kv head), q/k/v biases, scale `head_dim**-0.5`, softmax in fp32
(`jax.nn.dot_product_attention`), a causal mask over the whole sequence plus key padding.

M-RoPE: rotate-half rotary on the first `rotary_dim = head_dim * partial_rotary_factor` dims of each head (the rest
passes through). Frequency `j` (of `rotary_dim / 2`) takes its position from axis t, h or w according to the
contiguous `mrope_section` split (e.g. [8, 12, 12]: j < 8 -> t, j < 20 -> h, else w); the angle vector is
`concat([f, f])`. This is NOT GLM-4's interleaved rotary. Position ids are `[3, B, L]` from
`glm_jax.models.positions`.

KV cache: `KVCache(k, v, valid)` with per-layer post-RoPE K and V `[B, kv_heads, S_max, head_dim]` (unexpanded
GQA heads) and a key-validity mask `[B, S_max]`. `prefill` writes slots 0..L-1, `decode` / `extend` write slots
from `index` on with `lax.dynamic_update_slice`; everything is pure and fixed-shape, so the cache can be donated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from glm_jax.models.ar_ops import add_rms_norm, gated_activation
from glm_jax.models.layers import Dense, DType, RMSNorm, dtype_from_name, param
from glm_jax.models.pallas_tiles import triton_available
from glm_jax.models.remat import layer_call
from glm_jax.sharding import constrain, per_device, tensor_unsplit

STREAM_AXES = ("batch", "length", "embed")   # the residual stream, for `glm_jax.sharding.constrain`
CACHE_AXES = ("batch", "kv_heads", "length", "head_dim")      # a layer's K or V cache

AttentionImpl = str | None  # None (let JAX pick), "xla" or "cudnn"


# ----------------------------------------------------------------------------------------------------------------
# Config


@dataclass(frozen=True)
class ArTextConfig:
    """Text decoder sizes, read from the HF `text_config` dict."""

    vocab_size: int = 168064
    hidden_size: int = 4096
    intermediate_size: int = 13696
    num_layers: int = 40
    num_heads: int = 32
    num_kv_heads: int = 2
    head_dim: int = 128
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 0.5
    mrope_section: tuple[int, ...] = (8, 12, 12)
    attention_bias: bool = True
    vision_vocab_size: int = 16512
    pad_token_id: int | None = 167841
    eos_token_id: int = 16385
    hidden_act: str = "silu"

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @classmethod
    def from_hf(cls, d: dict) -> ArTextConfig:
        """Reads a `GlmImageTextConfig` dict (missing keys take the transformers class defaults)."""
        dflt = cls()
        hidden = d.get("hidden_size", dflt.hidden_size)
        heads = d.get("num_attention_heads", dflt.num_heads)
        kv = d.get("num_key_value_heads") or heads
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "mrope"):
            raise ValueError(f"text_config.rope_parameters.rope_type={rope_type!r} is not supported")
        theta = rope.get("rope_theta", d.get("rope_theta", dflt.rope_theta))
        partial = rope.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))
        eos = d.get("eos_token_id", dflt.eos_token_id)
        cfg = cls(
            vocab_size=d.get("vocab_size", dflt.vocab_size), hidden_size=hidden,
            intermediate_size=d.get("intermediate_size", dflt.intermediate_size),
            num_layers=d.get("num_hidden_layers", dflt.num_layers), num_heads=heads, num_kv_heads=kv,
            head_dim=d.get("head_dim") or hidden // heads, rms_norm_eps=d.get("rms_norm_eps", dflt.rms_norm_eps),
            rope_theta=float(theta), partial_rotary_factor=float(partial),
            mrope_section=tuple(rope.get("mrope_section", dflt.mrope_section)),
            attention_bias=d.get("attention_bias", dflt.attention_bias),
            vision_vocab_size=d.get("vision_vocab_size", dflt.vision_vocab_size),
            pad_token_id=d.get("pad_token_id", dflt.pad_token_id),
            eos_token_id=eos[0] if isinstance(eos, (list, tuple)) else eos,
            hidden_act=d.get("hidden_act", dflt.hidden_act))
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"text_config: num_attention_heads={self.num_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_kv_heads}")
        if sum(self.mrope_section) * 2 != self.rotary_dim:
            raise ValueError(f"text_config.rope_parameters.mrope_section={list(self.mrope_section)} must sum to "
                             f"head_dim*partial_rotary_factor/2 = {self.rotary_dim // 2}")
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"text_config.hidden_act={self.hidden_act!r} is not supported")


@dataclass(frozen=True)
class ArConfig:
    """Whole AR model: text decoder, source-image ViT + VQ, and the special token ids."""

    text: ArTextConfig
    vision: object  # glm_jax.models.ar_vision.VisionConfig
    vq: object  # glm_jax.models.ar_vision.VQConfig
    image_token_id: int = 167855
    image_start_token_id: int = 16384
    image_end_token_id: int = 16385
    dtype: str | None = None

    @classmethod
    def from_hf(cls, d: dict) -> ArConfig:
        """Reads the HF `GlmImageConfig` dict (`vision_language_encoder/config.json`)."""
        from glm_jax.models.ar_vision import VisionConfig, VQConfig

        return cls(text=ArTextConfig.from_hf(d.get("text_config") or {}),
                   vision=VisionConfig.from_hf(d.get("vision_config") or {}),
                   vq=VQConfig.from_hf(d.get("vq_config") or {}),
                   image_token_id=d.get("image_token_id", 167855),
                   image_start_token_id=d.get("image_start_token_id", 16384),
                   image_end_token_id=d.get("image_end_token_id", 16385),
                   dtype=d.get("dtype") or d.get("torch_dtype"))

    @property
    def param_dtype(self):
        return dtype_from_name(self.dtype, jnp.float32)


_ACTIVATIONS = {"silu": jax.nn.silu, "swish": jax.nn.silu, "gelu": lambda x: jax.nn.gelu(x, approximate=False)}


# ----------------------------------------------------------------------------------------------------------------
# M-RoPE


def rope_inv_freq(cfg: ArTextConfig) -> np.ndarray:
    """`1 / theta^(2j / rotary_dim)` in fp32, computed as transformers does."""
    dim = cfg.rotary_dim
    return (1.0 / (np.float32(cfg.rope_theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))
            ).astype(np.float32)


def mrope_axis_of_freq(sections: tuple[int, ...]) -> np.ndarray:
    """For each rotary frequency j, which position axis (0 = t, 1 = h, 2 = w) drives it (section k -> axis k % 3)."""
    return np.concatenate([np.full(n, k % 3) for k, n in enumerate(sections)]).astype(np.int32)


def mrope_cos_sin(position_ids_3BT: jax.Array, cfg: ArTextConfig, dtype: DType) -> tuple[jax.Array, jax.Array]:
    """cos, sin `[B, T, rotary_dim]` for 3-D position ids `[3, B, T]` (angles in fp32, then cast to `dtype`)."""
    axis = mrope_axis_of_freq(cfg.mrope_section)
    pos_BTF = jnp.moveaxis(position_ids_3BT, 0, -1)[..., axis].astype(jnp.float32)
    ang_BTF = pos_BTF * jnp.asarray(rope_inv_freq(cfg))
    ang_BTR = jnp.concatenate([ang_BTF, ang_BTF], axis=-1)
    return jnp.cos(ang_BTR).astype(dtype), jnp.sin(ang_BTR).astype(dtype)


def apply_rope(x_BTNH: jax.Array, cos_BTR: jax.Array, sin_BTR: jax.Array) -> jax.Array:
    """Rotate-half rotary on the first `R` dims of every head; the remaining dims pass through."""
    r = cos_BTR.shape[-1]
    x_rot, x_pass = x_BTNH[..., :r], x_BTNH[..., r:]
    x1, x2 = x_rot[..., : r // 2], x_rot[..., r // 2:]
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    cos, sin = cos_BTR[:, :, None, :], sin_BTR[:, :, None, :]
    return jnp.concatenate([x_rot * cos + rotated * sin, x_pass], axis=-1)


# ----------------------------------------------------------------------------------------------------------------
# Modules


class Embed(nnx.Module):
    """Token embedding table `embedding [vocab, D]`; lookup in the parameter dtype, then cast to `dtype`."""

    COMPUTE_CAST = ("embedding",)   # see layers.cast_for_compute

    def __init__(self, num: int, dim: int, *, dtype: DType = jnp.float32, param_dtype: DType = jnp.float32,
                 rngs: nnx.Rngs):
        self.dtype = dtype
        self.embedding = param(rngs, (num, dim), ("vocab", "embed"), param_dtype)

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)


class KVCache(NamedTuple):
    """Per-layer post-RoPE keys and values `[B, kv_heads, S_max, head_dim]` and key validity `[B, S_max]`."""

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    valid: jax.Array


class TextAttention(nnx.Module):
    """GQA self-attention with q/k/v biases and partial M-RoPE; optionally over a KV cache."""

    def __init__(self, cfg: ArTextConfig, *, dtype: DType, param_dtype: DType, rngs: nnx.Rngs,
                 implementation: AttentionImpl = None):
        d, h, kv, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = h, kv, hd
        self.implementation = implementation
        # the `dot_product_attention` implementation of calls without a cache (training / re-scoring, the only
        # differentiated path); None = `implementation`. Set by `GlmImageStack.load(attention=...)` from the
        # config's `model.attention`, so that the rollouts' prefill keeps `implementation`
        self.train_implementation: AttentionImpl = None
        # one-token steps over a cache: "auto" (Pallas kernel on GPU when the cache has a multiple of 128 slots
        # and no `tensor` mesh axis splits the heads, else einsum), "einsum" (`decode_attention`), "pallas"
        # (`decode_attention_pallas`, per device under a mesh) or "dpa"
        self.decode_attention = "auto"
        self.fuse_qkv = True               # one-token steps: one matmul for q/k/v (kernels concatenated)
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        self.q_proj = Dense(d, h * hd, axes=("embed", "heads"), use_bias=cfg.attention_bias, **kw)
        self.k_proj = Dense(d, kv * hd, axes=("embed", "kv_heads"), use_bias=cfg.attention_bias, **kw)
        self.v_proj = Dense(d, kv * hd, axes=("embed", "kv_heads"), use_bias=cfg.attention_bias, **kw)
        self.o_proj = Dense(h * hd, d, axes=("heads", "embed"), use_bias=False, **kw)

    def __call__(self, x_BTD: jax.Array, cos_BTR: jax.Array, sin_BTR: jax.Array, mask_BTS: jax.Array,
                 kv: tuple[jax.Array, jax.Array] | None = None, index: jax.Array | int = 0
                 ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        """Attention output `[B, T, D]`. Without `kv`, keys are this chunk's tokens (`mask_BTS` is `[B, T, T]`);
        with `kv = (k_cache, v_cache)` the chunk's K/V are written at slot `index` and the queries attend over the
        whole cache (`mask_BTS` is `[B, T, S_max]`); the updated pair is returned."""
        b, t, _ = x_BTD.shape
        if self.fuse_qkv and t == 1:
            q, k, v = self._qkv_fused(x_BTD)
        else:
            q, k, v = self.q_proj(x_BTD), self.k_proj(x_BTD), self.v_proj(x_BTD)
        q = q.reshape(b, t, self.num_heads, self.head_dim)
        k = k.reshape(b, t, self.num_kv_heads, self.head_dim)
        v = v.reshape(b, t, self.num_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos_BTR, sin_BTR), apply_rope(k, cos_BTR, sin_BTR)
        if kv is not None:
            k_cache, v_cache = kv     # [B, kv_heads, S, head_dim]
            start = (0, 0, index, 0)
            k_cache = jax.lax.dynamic_update_slice(k_cache, k.swapaxes(1, 2).astype(k_cache.dtype), start)
            v_cache = jax.lax.dynamic_update_slice(v_cache, v.swapaxes(1, 2).astype(v_cache.dtype), start)
            k_cache, v_cache = (constrain(c, CACHE_AXES) for c in (k_cache, v_cache))
            kv = (k_cache, v_cache)
            mode = self.decode_attention
            if mode == "auto":
                mode = ("pallas" if jax.default_backend() == "gpu" and k_cache.shape[2] % 128 == 0
                        and tensor_unsplit() and triton_available() else "einsum")
            if t == 1 and mode in ("einsum", "pallas"):
                args = (q, k_cache.astype(q.dtype), v_cache.astype(q.dtype), mask_BTS[:, 0])
                scale = self.head_dim ** -0.5
                if mode == "einsum":
                    o = decode_attention(*args, scale, index)
                else:       # a Pallas call: per device on its rows (XLA would gather every row's cache to each)
                    o, = per_device(lambda q_, k_, v_, m_, i_: (decode_attention_pallas(q_, k_, v_, m_, scale, i_),),
                                    (*args, jnp.asarray(index, jnp.int32)), (True, True, True, True, False),
                                    ("batch",))
                return self.o_proj(o.reshape(b, t, self.num_heads * self.head_dim)), kv
            k, v = k_cache.swapaxes(1, 2).astype(q.dtype), v_cache.swapaxes(1, 2).astype(q.dtype)
        q = constrain(q, ("batch", "length", "heads", "head_dim"))
        k, v = (constrain(x, ("batch", "length", "kv_heads", "head_dim")) for x in (k, v))
        impl = self.implementation if kv is not None or self.train_implementation is None \
            else self.train_implementation
        o = jax.nn.dot_product_attention(q, k, v, mask=mask_BTS[:, None], scale=self.head_dim ** -0.5,
                                         implementation=impl)
        return self.o_proj(o.reshape(b, t, self.num_heads * self.head_dim)), kv


    def _qkv_fused(self, x_BTD):
        ps = (self.q_proj, self.k_proj, self.v_proj)
        dt = self.q_proj.dtype
        w = jnp.concatenate([p.kernel[...].astype(dt) for p in ps], axis=1)
        y = jnp.dot(x_BTD.astype(dt), w)
        if self.q_proj.bias is not None:
            y = y + jnp.concatenate([p.bias[...].astype(dt) for p in ps])
        n_q, n_k = self.q_proj.out_features, self.k_proj.out_features
        parts = (y[..., :n_q], y[..., n_q:n_q + n_k], y[..., n_q + n_k:])
        return tuple(o + p.lora_delta(x_BTD) for o, p in zip(parts, ps, strict=True))


def decode_attention(q_B1ND: jax.Array, k_BKSD: jax.Array, v_BKSD: jax.Array, mask_BS: jax.Array,
                     scale: float, index=None) -> jax.Array:
    """Attention of one query per row over a KV cache `[B, kv_heads, S, D]`, GQA without expanding K/V:
    `[B, 1, N, D]`.

    Scores and softmax in fp32 (as `dot_product_attention` does); a plain memory-bound read of the cache that XLA
    fuses, cheaper at one query than a flash-attention kernel."""
    b, _, n, d = q_B1ND.shape
    kv = k_BKSD.shape[1]
    q_BKGD = q_B1ND.reshape(b, kv, n // kv, d)
    s_BKGS = jnp.einsum("bkgd,bksd->bkgs", q_BKGD, k_BKSD, preferred_element_type=jnp.float32) * scale
    s_BKGS = jnp.where(mask_BS[:, None, None, :], s_BKGS, jnp.finfo(jnp.float32).min)
    p_BKGS = jax.nn.softmax(s_BKGS, axis=-1)
    o_BKGD = jnp.einsum("bkgs,bksd->bkgd", p_BKGS.astype(v_BKSD.dtype), v_BKSD,
                        preferred_element_type=jnp.float32)
    return o_BKGD.astype(q_B1ND.dtype).reshape(b, 1, n, d)


def decode_attention_pallas(q_B1ND: jax.Array, k_BKSD: jax.Array, v_BKSD: jax.Array, mask_BS: jax.Array,
                            scale: float, index) -> jax.Array:
    """`decode_attention` by the split-K Pallas (Triton) kernel of `decode_ops`, reading only the filled slots
    `[first valid, index]` of each row (the valid keys of a left-padded decode are that contiguous range). Made
    for GPUs; on other backends it runs in Pallas' interpreter (tests)."""
    from glm_jax.models.decode_ops import decode_attention_blocks

    b, _, n, d = q_B1ND.shape
    kv = k_BKSD.shape[1]
    start_B = jnp.argmax(mask_BS, axis=-1).astype(jnp.int32)
    o_BKGD = decode_attention_blocks(q_B1ND.reshape(b, kv, n // kv, d), k_BKSD, v_BKSD, start_B,
                                     jnp.asarray(index, jnp.int32) + 1, scale,
                                     interpret=jax.default_backend() != "gpu")
    return o_BKGD.reshape(b, 1, n, d)


class TextMLP(nnx.Module):
    """`down(up * act(gate))` with `[gate; up] = gate_up_proj(x)` fused (gate = first half)."""

    def __init__(self, cfg: ArTextConfig, *, dtype: DType, param_dtype: DType, rngs: nnx.Rngs):
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        self.act = _ACTIVATIONS[cfg.hidden_act]
        self.gate_up_proj = Dense(cfg.hidden_size, 2 * cfg.intermediate_size, axes=("embed", "mlp"),
                                  use_bias=False, **kw)
        self.down_proj = Dense(cfg.intermediate_size, cfg.hidden_size, axes=("mlp", "embed"), use_bias=False, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(gated_activation(self.gate_up_proj(x), self.act))


class TextDecoderLayer(nnx.Module):
    """One decoder layer with sandwich RMSNorms around attention and MLP."""

    def __init__(self, cfg: ArTextConfig, *, dtype: DType, param_dtype: DType, rngs: nnx.Rngs,
                 implementation: AttentionImpl = None):
        nkw = {"eps": cfg.rms_norm_eps, "param_dtype": param_dtype, "rngs": rngs}
        self.input_layernorm = RMSNorm(cfg.hidden_size, **nkw)
        self.post_self_attn_layernorm = RMSNorm(cfg.hidden_size, **nkw)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, **nkw)
        self.post_mlp_layernorm = RMSNorm(cfg.hidden_size, **nkw)
        self.self_attn = TextAttention(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                                       implementation=implementation)
        self.mlp = TextMLP(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x_BTD, cos_BTR, sin_BTR, mask_BTS, kv=None, index=0):
        a, kv = self.self_attn(self.input_layernorm(x_BTD), cos_BTR, sin_BTR, mask_BTS, kv, index)
        x_BTD = x_BTD + self.post_self_attn_layernorm(a)
        m = self.mlp(self.post_attention_layernorm(x_BTD))
        return x_BTD + self.post_mlp_layernorm(m), kv


class GlmImageText(nnx.Module):
    """Text decoder: embeddings, decoder layers (an `nnx.List`), final RMSNorm."""

    def __init__(self, cfg: ArTextConfig, *, dtype: DType = jnp.float32, param_dtype: DType = jnp.float32,
                 rngs: nnx.Rngs, implementation: AttentionImpl = None):
        self.cfg, self.dtype = cfg, dtype
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layers = nnx.List([TextDecoderLayer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                                                 implementation=implementation) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype, rngs=rngs)
        self.remat = "none"   # rematerialisation policy of each layer without a cache (`glm_jax.models.remat`)
        self.fuse_norms = True   # one-token steps: residual adds fused with the next norm (`_decode_step`)

    def __call__(self, input_ids_BT: jax.Array, position_ids_3BT: jax.Array, mask_BTS: jax.Array,
                 cache: KVCache | None = None, index: jax.Array | int = 0
                 ) -> tuple[jax.Array, KVCache | None]:
        """Final hidden states `[B, T, D]` (after the final norm) and the updated cache (if one was given)."""
        x = self.embed_tokens(input_ids_BT)
        cos, sin = mrope_cos_sin(position_ids_3BT, self.cfg, self.dtype)
        if cache is not None and input_ids_BT.shape[1] == 1 and self.fuse_norms:
            return self._decode_step(x, cos, sin, mask_BTS, cache, index)
        ks, vs = [], []
        for i, layer in enumerate(self.layers):
            if cache is None:   # training / re-scoring: the only path that is differentiated
                x, _ = layer_call(layer, self.remat, constrain(x, STREAM_AXES), cos, sin, mask_BTS)
                continue
            x, kv = layer(constrain(x, STREAM_AXES), cos, sin, mask_BTS, (cache.k[i], cache.v[i]), index)
            if kv is not None:
                ks.append(kv[0])
                vs.append(kv[1])
        new_cache = None if cache is None else cache._replace(k=tuple(ks), v=tuple(vs))
        return self.norm(x), new_cache

    def _decode_step(self, x, cos, sin, mask_BTS, cache: KVCache, index):
        """The layers of a one-token step, each sandwich norm's residual update fused with the norm after it
        (`ar_ops.add_rms_norm`: the next sub-layer's input norm, across layers too, and the final norm): what
        `TextDecoderLayer.__call__` computes, in two ops per layer instead of four norms and two adds."""
        layers = list(self.layers)
        h = layers[0].input_layernorm(x)
        ks, vs = [], []
        for i, layer in enumerate(layers):
            x = constrain(x, STREAM_AXES)
            a, kv = layer.self_attn(h, cos, sin, mask_BTS, (cache.k[i], cache.v[i]), index)
            ks.append(kv[0])
            vs.append(kv[1])
            x, h = add_rms_norm(x, a, layer.post_self_attn_layernorm.weight[...],
                                layer.post_attention_layernorm.weight[...], layer.post_self_attn_layernorm.eps,
                                layer.post_attention_layernorm.eps)
            m = layer.mlp(h)
            nxt = layers[i + 1].input_layernorm if i + 1 < len(layers) else self.norm
            x, h = add_rms_norm(x, m, layer.post_mlp_layernorm.weight[...],
                                nxt.weight[...], layer.post_mlp_layernorm.eps, nxt.eps)
        return h, cache._replace(k=tuple(ks), v=tuple(vs))


# ----------------------------------------------------------------------------------------------------------------
# Masks and helpers


def causal_padding_mask(attention_mask_BL: jax.Array) -> jax.Array:
    """`[B, L, L]` bool: query i sees key j <= i if j is a real token; every query also sees itself (so that
    padding rows stay finite)."""
    length = attention_mask_BL.shape[1]
    i = jnp.arange(length)
    causal = i[None, :] <= i[:, None]
    return (causal[None] & attention_mask_BL[:, None, :].astype(bool)) | (i[:, None] == i[None, :])[None]


def cache_mask(valid_BS: jax.Array, index: jax.Array | int, t: int) -> jax.Array:
    """`[B, t, S]` bool for a chunk of `t` queries at slots `index..index+t-1` over the cache slots."""
    q = index + jnp.arange(t)
    s = jnp.arange(valid_BS.shape[1])
    allowed = (s[None, :] <= q[:, None])[None] & valid_BS[:, None, :]
    return allowed | (s[None, :] == q[:, None])[None]


def scatter_image_codes(input_ids_BL: jax.Array, codes_N: jax.Array, image_token_id: int) -> jax.Array:
    """Replaces the `<|image|>` placeholders of `input_ids` by `codes`, in row-major order (like torch's
    `masked_scatter`). The number of placeholders must equal `len(codes)` (not checked inside jit)."""
    is_img = input_ids_BL == image_token_id
    idx = jnp.cumsum(is_img.reshape(-1)) - 1
    fill = codes_N.astype(input_ids_BL.dtype)[jnp.clip(idx, 0, codes_N.shape[0] - 1)].reshape(input_ids_BL.shape)
    return jnp.where(is_img, fill, input_ids_BL)


# ----------------------------------------------------------------------------------------------------------------
# Top-level AR


class GlmImageAR(nnx.Module):
    """The AR model: text decoder `text`, head `lm_head` (image-code vocabulary only), source-image tokenizer
    `visual` (ViT) + `vqmodel` (VQ). `with_vision=False` builds a text-only model (t2i needs no ViT/VQ)."""

    def __init__(self, cfg: ArConfig, *, dtype: DType = jnp.float32, param_dtype: DType = jnp.float32,
                 rngs: nnx.Rngs, implementation: AttentionImpl = None, with_vision: bool = True):
        self.cfg, self.dtype = cfg, dtype
        t = cfg.text
        self.text = GlmImageText(t, dtype=dtype, param_dtype=param_dtype, rngs=rngs, implementation=implementation)
        self.lm_head = Dense(t.hidden_size, t.vision_vocab_size, axes=("embed", "vocab"), use_bias=False,
                             dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        if with_vision:
            from glm_jax.models.ar_vision import GlmImageVision, GlmImageVQ

            self.visual = GlmImageVision(cfg.vision, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
            self.vqmodel = GlmImageVQ(cfg.vq, cfg.vision.hidden_size, dtype=dtype, param_dtype=param_dtype,
                                      rngs=rngs)
        else:
            self.visual = self.vqmodel = None

    # -- source images --------------------------------------------------------------------------------------

    def image_tokens(self, pixel_values_NP: jax.Array, grids: tuple[tuple[int, int], ...]) -> jax.Array:
        """VQ codes `[N]` (int32, raster order per image) of source images given as patch rows `[N, C*p*p]`."""
        if self.visual is None:
            raise ValueError("this GlmImageAR was built with with_vision=False")
        grids = tuple((int(h), int(w)) for h, w in grids)
        return self.vqmodel.encode(self.visual(pixel_values_NP, grids), grids)

    def insert_image_tokens(self, input_ids_BL: jax.Array, pixel_values_NP: jax.Array,
                            grids: tuple[tuple[int, int], ...]) -> jax.Array:
        """`input_ids` with every `<|image|>` placeholder replaced by the source images' codes (in order)."""
        codes = self.image_tokens(pixel_values_NP, grids)
        return scatter_image_codes(input_ids_BL, codes, self.cfg.image_token_id)

    # -- full sequence --------------------------------------------------------------------------------------

    def logits(self, hidden_BTD: jax.Array, fp32: bool = True) -> jax.Array:
        """Logits over the image-code vocabulary from final hidden states: fp32, or with `fp32=False` in the
        head's compute dtype (the same values before the cast; e.g. bf16, which the sampler's processing sorts
        faster)."""
        out = self.lm_head(hidden_BTD)
        return out.astype(jnp.float32) if fp32 else out

    def hidden_states(self, input_ids_BL: jax.Array, position_ids_3BL: jax.Array,
                      attention_mask_BL: jax.Array | None = None) -> jax.Array:
        """Final-norm hidden states `[B, L, D]` of a whole (left-padded) sequence, causal + padding mask."""
        if attention_mask_BL is None:
            attention_mask_BL = jnp.ones(input_ids_BL.shape, bool)
        h, _ = self.text(input_ids_BL, position_ids_3BL, causal_padding_mask(attention_mask_BL))
        return h

    def forward(self, input_ids_BL: jax.Array, position_ids_3BL: jax.Array,
                attention_mask_BL: jax.Array | None = None) -> jax.Array:
        """Logits `[B, L, V]` (fp32) of a whole sequence (teacher forcing / re-scoring)."""
        return self.logits(self.hidden_states(input_ids_BL, position_ids_3BL, attention_mask_BL))

    __call__ = forward

    # -- KV cache ------------------------------------------------------------------------------------------

    def init_cache(self, batch: int, max_len: int, dtype: DType | None = None) -> KVCache:
        """An empty cache for at least `max_len` slots (all keys invalid), rounded up to a multiple of 128: the
        block of the GPU decode-attention kernel, which then reads only the filled blocks of each row."""
        t = self.cfg.text
        max_len = -(-max_len // 128) * 128
        dtype = self.dtype if dtype is None else dtype
        shape = (batch, t.num_kv_heads, max_len, t.head_dim)
        zeros = tuple(jnp.zeros(shape, dtype) for _ in range(t.num_layers))
        return KVCache(k=zeros, v=tuple(jnp.zeros(shape, dtype) for _ in range(t.num_layers)),
                       valid=jnp.zeros((batch, max_len), bool))

    def extend(self, input_ids_BT: jax.Array, position_ids_3BT: jax.Array, cache: KVCache,
               index: jax.Array | int, token_mask_BT: jax.Array | None = None) -> tuple[jax.Array, KVCache]:
        """Runs a chunk of `T` tokens at cache slots `index..index+T-1` (teacher forcing over a cache).

        Returns final hidden states `[B, T, D]` and the updated cache; `token_mask` (default all real) marks which
        of the chunk's slots are valid keys for later queries.
        """
        b, t = input_ids_BT.shape
        if token_mask_BT is None:
            token_mask_BT = jnp.ones((b, t), bool)
        valid = jax.lax.dynamic_update_slice(cache.valid, token_mask_BT.astype(bool), (0, index))
        cache = cache._replace(valid=valid)
        h, cache = self.text(input_ids_BT, position_ids_3BT, cache_mask(valid, index, t), cache, index)
        return h, cache

    def prefill(self, input_ids_BL: jax.Array, position_ids_3BL: jax.Array, attention_mask_BL: jax.Array | None,
                cache: KVCache, fp32: bool = True) -> tuple[jax.Array, KVCache]:
        """Writes the prompt into slots 0..L-1 of `cache`; returns the last position's logits `[B, V]` (fp32, or
        in the head's dtype with `fp32=False`, see `logits`)."""
        h, cache = self.extend(input_ids_BL, position_ids_3BL, cache, 0, attention_mask_BL)
        return self.logits(h[:, -1], fp32), cache

    def decode(self, token_B: jax.Array, position_ids_3B: jax.Array, cache: KVCache, index: jax.Array | int,
               fp32: bool = True) -> tuple[jax.Array, KVCache]:
        """One decode step: writes `token` at slot `index`, returns its next-token logits `[B, V]` (fp32, or in
        the head's dtype with `fp32=False`)."""
        h, cache = self.extend(token_B[:, None], position_ids_3B[:, :, None], cache, index)
        return self.logits(h[:, 0], fp32), cache
