"""GLM-Image DiT (diffusers `GlmImageTransformer2DModel`) in Flax NNX, with the i2i reference-image K/V cache.

Layout: latents are channels-last `[B, H', W', C]` (H' = H/8) in and out; the torch model is NCHW. Tokens are
`p x p` patches in raster order, `N = (H'/p)(W'/p)`; the patch feature order is `(c, py, px)` as in torch, so the
`image_projector` / `proj_out` kernels are plain transposes of the torch weights.

    img  = image_projector(patchify(x)) + prior_projector(where(drop, 0, prior_token_embedding[ids]))
    txt  = glyph_projector(glyph)                       (Linear - exact GELU - Linear; T may be 0)
    temb = silu(timestep_mlp(sincos(t)) + condition_mlp(sincos(crop_top, crop_left, H, W)))
    per block (single stream: one set of QKV / FF weights for both streams, separate adaLN modulation):
        12 chunks of norm1.linear(temb): shift, c_shift, scale, c_scale, gate, c_gate (attention) then the same
        six for the FF ("c_" = text stream)
        s = [LN(txt)(1 + c_scale) + c_shift ; LN(img)(1 + scale) + shift]
        (computed on the joint stream x = [txt ; img]: every matmul sees both streams at once, the modulation
        vector is picked per position)
        q, k, v = heads(s W + b); q, k = LN_head(q), LN_head(k); 2-D RoPE on the image tokens only
        o = to_out(softmax(q k^T / sqrt(head_dim)) v)     (no mask: padded glyph positions are attended)
        txt += o_txt * c_gate; img += o_img * gate; then the same with a tanh-GELU FF (shared weights)
    out  = unpatchify(proj_out(LN(img)(1 + scale) + shift)),   [scale; shift] = norm_out.linear(temb)

Quirks kept on purpose (see design/glm_image_architecture.md §3):
* The sincos embeddings use `flip_sin_to_cos` (cos first), frequency `exp(-ln(1e4) k / (dim / 2))`, and are
  computed in float32, then cast to the compute dtype before the MLPs. The condition vector is the sincos of
  `crop_top, crop_left, target_h, target_w` in that order (crop first). `temb` is already SiLU-ed when it reaches
  the adaLN linears and `norm_out` (no second activation).
* `norm_out.linear` is `[scale; shift]` (scale first), unlike the usual `[shift; scale]`.
* All LayerNorms are affine-free with eps 1e-5; statistics in float32, output in the input dtype (also for the
  per-head qk norm). RoPE is applied in float32 and cast back. The FF uses the tanh GELU, the glyph projector the
  exact GELU, the prior projector SiLU.
* 2-D RoPE over `head_dim`: `inv_k = 1e4^(-k / (head_dim/4))`, `angles = [row * inv, col * inv]` duplicated to
  `head_dim`, applied as `x cos + [-x[D/2:], x[:D/2]] sin` (diffusers `use_real_unbind_dim=-2`). Text tokens get
  no RoPE. A reference image gets its own grid from (0, 0), no offset.
* The torch model's optional text `attention_mask` is never used by the pipeline and is not implemented.

Reference K/V cache (`kv_mode`), the functional form of diffusers' `GlmImageKVCache`:
* `"write"`: returns, per layer, the image tokens' post-qk-norm post-RoPE `(k, v)` `[B, S_ref, heads, head_dim]`
  (a list over layers). The pipeline's write pass has glyph length 0, so this is exactly what torch stores (torch
  would also store text keys if there were any). Several reference images are concatenated along S.
* `"read"`: every layer attends to `[K_ref ; K_txt ; K_img]` (V likewise; queries unchanged). A reference batch of
  `B_r` is repeated to the batch as torch does (`B_r = 1` broadcast, `B_r = B` per sample, else each cached sample
  `B / B_r` times in a row).
* `"skip"` / `"none"`: plain pass (the CFG unconditional branch uses "skip").

Parameter paths follow the torch names (`transformer_blocks.{i}.attn1.to_q.kernel`, ...) except that
diffusers' `FeedForward.net.0.proj` / `net.2` are `proj_in` / `proj_out` and `attn1.to_out.0` is `attn1.to_out`;
`conversion/tables/dit.py` maps them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from glm_jax.models.dit_ops import (
    bias_gelu,
    gated_residual,
    kernel_length,
    modulate_split,
    qk_norm_rope,
    round_rows,
)
from glm_jax.models.layers import Dense, DType, Embedding, layer_norm
from glm_jax.models.remat import check_policy, layer_call
from glm_jax.sharding import constrain

# logical axes of large activations, for `glm_jax.sharding.constrain` (the identity without a mesh)
STREAM_AXES = ("batch", "length", "embed")
QKV_AXES = ("batch", "length", "heads", "head_dim")

LN_EPS = 1e-5
ROPE_THETA = 10000.0
KV_MODES = ("none", "write", "read", "skip")

# diffusers class defaults, used only for keys absent from config.json (the checkpoint differs: 32 x 128 heads).
_HF_DEFAULTS = {"patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 30, "attention_head_dim": 40,
                "num_attention_heads": 64, "text_embed_dim": 1472, "time_embed_dim": 512, "condition_dim": 256,
                "prior_vq_quantizer_codebook_size": 16384}


@dataclass(frozen=True)
class DiTConfig:
    """Sizes of `GlmImageTransformer2DModel`, named as in diffusers' `transformer/config.json`."""

    patch_size: int = 2
    in_channels: int = 16
    out_channels: int = 16
    num_layers: int = 30
    attention_head_dim: int = 128
    num_attention_heads: int = 32
    text_embed_dim: int = 1472
    time_embed_dim: int = 512
    condition_dim: int = 256
    prior_vq_quantizer_codebook_size: int = 16384

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def ff_dim(self) -> int:
        """Hidden width of the block FF (diffusers `FeedForward` default `mult=4`)."""
        return 4 * self.inner_dim

    @classmethod
    def from_hf(cls, d: dict) -> DiTConfig:
        """Reads a diffusers `transformer/config.json` dict; absent keys take the diffusers class defaults.

        `out_channels: null` means `in_channels` (diffusers stores it as given). `attention_head_dim` must be a
        multiple of 4 (2-D RoPE splits it into row / column halves of sin / cos pairs).
        """
        v = {k: d.get(k, default) for k, default in _HF_DEFAULTS.items()}
        if v["out_channels"] is None:
            v["out_channels"] = v["in_channels"]
        cfg = cls(**{k: int(x) for k, x in v.items()})
        if cfg.attention_head_dim % 4:
            raise ValueError(f"config.json: attention_head_dim={cfg.attention_head_dim} is not a multiple of 4 "
                             f"(2-D RoPE needs it)")
        return cfg


# --------------------------------------------------------------------------------------------- pure functions


def sincos_embedding(x_B: jax.Array, dim: int) -> jax.Array:
    """diffusers `get_timestep_embedding(x, dim, flip_sin_to_cos=True, downscale_freq_shift=0)`, float32 `[B, dim]`.

    `[cos(x f), sin(x f)]` with `f_k = exp(-ln(10000) k / (dim // 2))`; an odd `dim` gets one zero column.
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half)
    ang = x_B.astype(jnp.float32)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.cos(ang), jnp.sin(ang)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def rope_2d(height: int, width: int, head_dim: int) -> tuple[jax.Array, jax.Array]:
    """`cos, sin` float32 `[height * width, head_dim]` of the 2-D RoPE over a raster token grid.

    `inv_k = theta^(-2k / (head_dim/2))`, k < head_dim/4; angles `[row * inv, col * inv]` duplicated.
    """
    half = head_dim // 2
    inv = 1.0 / (ROPE_THETA ** (jnp.arange(0, half, 2, dtype=jnp.float32)[: half // 2] / half))
    rows = jnp.arange(height, dtype=jnp.float32)[:, None, None] * inv
    cols = jnp.arange(width, dtype=jnp.float32)[None, :, None] * inv
    f = jnp.concatenate([jnp.broadcast_to(rows, (height, width, inv.size)),
                         jnp.broadcast_to(cols, (height, width, inv.size))], axis=-1)
    f = jnp.concatenate([f, f], axis=-1).reshape(height * width, head_dim)
    return jnp.cos(f), jnp.sin(f)


def patchify(x_BHWC: jax.Array, p: int) -> jax.Array:
    """`[B, H, W, C]` -> `[B, (H/p)(W/p), C p p]` with the features in torch's `(c, py, px)` order."""
    b, h, w, c = x_BHWC.shape
    x = x_BHWC.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 5, 2, 4)
    return x.reshape(b, (h // p) * (w // p), c * p * p)


def unpatchify(x_BNF: jax.Array, hp: int, wp: int, p: int) -> jax.Array:
    """Inverse of `patchify`: `[B, hp wp, C p p]` ((c, py, px) features) -> `[B, hp p, wp p, C]`."""
    b = x_BNF.shape[0]
    c = x_BNF.shape[-1] // (p * p)
    x = x_BNF.reshape(b, hp, wp, c, p, p).transpose(0, 1, 4, 2, 5, 3)
    return x.reshape(b, hp * p, wp * p, c)


def _act32(fn, x: jax.Array) -> jax.Array:
    """Activation evaluated in float32 and cast back (what torch's reduced-precision kernels do internally)."""
    return fn(x.astype(jnp.float32)).astype(x.dtype)


def _gelu_exact(x):
    return _act32(lambda v: jax.nn.gelu(v, approximate=False), x)


def _silu(x):
    return _act32(jax.nn.silu, x)


def _gelu_tanh(x: jax.Array) -> jax.Array:
    """The FF's `act`: `dit_ops.bias_gelu` without a bias (`Block` calls that op with `ff.proj_in`'s bias)."""
    return bias_gelu(x, jnp.zeros((x.shape[-1],), x.dtype))


def _modulate(x_BLD: jax.Array, shift_BD: jax.Array, scale_BD: jax.Array) -> jax.Array:
    return layer_norm(x_BLD, None, None, LN_EPS) * (1 + scale_BD[:, None, :]) + shift_BD[:, None, :]


def _expand_ref(ref_BSHD: jax.Array, batch: int) -> jax.Array:
    """Cached reference K or V to the batch: `B_r = 1` broadcast, `B_r = B` as is, else each repeated `B/B_r`."""
    br = ref_BSHD.shape[0]
    if br == batch:
        return ref_BSHD
    if br == 1:
        return jnp.broadcast_to(ref_BSHD, (batch,) + ref_BSHD.shape[1:])
    if batch % br:
        raise ValueError(f"cannot match {br} cached reference samples to batch size {batch}")
    return jnp.repeat(ref_BSHD, batch // br, axis=0)


# -------------------------------------------------------------------------------------------------- modules


class MLP2(nnx.Module):
    """`proj_out(act(proj_in(x)))`: diffusers `FeedForward` (`net.0.proj`, `net.2`), `TimestepEmbedding`
    (`linear_1`, `linear_2`) and `PixArtAlphaTextProjection` share this shape; names are set per use."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int, act, *, names: tuple[str, str],
                 axes: tuple[tuple[str | None, str | None], tuple[str | None, str | None]], dtype: DType,
                 param_dtype: DType, rngs: nnx.Rngs):
        self.act, self.names = act, names
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        setattr(self, names[0], Dense(d_in, d_hidden, axes=axes[0], **kw))
        setattr(self, names[1], Dense(d_hidden, d_out, axes=axes[1], **kw))

    def __call__(self, x: jax.Array) -> jax.Array:
        first, second = (getattr(self, n) for n in self.names)
        return second(self.act(first(x)))


def feed_forward(d_in: int, d_hidden: int, d_out: int, act, axes, **kw) -> MLP2:
    """diffusers `FeedForward`: `proj_in` = `net.0.proj`, `proj_out` = `net.2`."""
    return MLP2(d_in, d_hidden, d_out, act, names=("proj_in", "proj_out"), axes=axes, **kw)


class TimeConditionEmbed(nnx.Module):
    """`temb = silu(timestep_embedder(sincos(t)) + condition_embedder(sincos(crop, size)))` `[B, time_embed_dim]`."""

    def __init__(self, cfg: DiTConfig, *, dtype: DType, param_dtype: DType, rngs: nnx.Rngs):
        self.cfg, self.dtype = cfg, dtype
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        e = cfg.time_embed_dim
        self.timestep_embedder = MLP2(e, e, e, _silu, names=("linear_1", "linear_2"),
                                      axes=((None, "time"), ("time", None)), **kw)
        self.condition_embedder = MLP2(4 * cfg.condition_dim, e, e, _silu, names=("linear_1", "linear_2"),
                                       axes=(("cond", "time"), ("time", None)), **kw)

    def __call__(self, timestep_B: jax.Array, target_size_B2: jax.Array, crop_coords_B2: jax.Array) -> jax.Array:
        b = timestep_B.shape[0]
        c = self.cfg.condition_dim
        t_proj = sincos_embedding(timestep_B, self.cfg.time_embed_dim)
        crop = sincos_embedding(crop_coords_B2.reshape(-1), c).reshape(b, 2 * c)
        size = sincos_embedding(target_size_B2.reshape(-1), c).reshape(b, 2 * c)
        cond = jnp.concatenate([crop, size], axis=-1)
        te = self.timestep_embedder(t_proj.astype(self.dtype))
        ce = self.condition_embedder(cond.astype(self.dtype))
        return _silu(te + ce)


class AdaLNZero(nnx.Module):
    """`norm1`: the block's 12-way modulation `linear(temb)` (the LayerNorms have no parameters)."""

    def __init__(self, cfg: DiTConfig, *, dtype: DType, param_dtype: DType, rngs: nnx.Rngs):
        self.linear = Dense(cfg.time_embed_dim, 12 * cfg.inner_dim, axes=("time", "embed"), dtype=dtype,
                            param_dtype=param_dtype, rngs=rngs)

    def __call__(self, temb_BE: jax.Array) -> list[jax.Array]:
        return jnp.split(self.linear(temb_BE), 12, axis=-1)


class Attention(nnx.Module):
    """`attn1`: joint text + image attention with shared projections, qk LayerNorm and image-only 2-D RoPE."""

    def __init__(self, cfg: DiTConfig, *, implementation: str | None, dtype: DType, param_dtype: DType,
                 rngs: nnx.Rngs):
        d = cfg.inner_dim
        self.heads, self.head_dim = cfg.num_attention_heads, cfg.attention_head_dim
        self.implementation = implementation
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        self.to_q = Dense(d, d, axes=("embed", "heads"), **kw)
        self.to_k = Dense(d, d, axes=("embed", "heads"), **kw)
        self.to_v = Dense(d, d, axes=("embed", "heads"), **kw)
        self.to_out = Dense(d, d, axes=("heads", "embed"), **kw)

    def __call__(self, s_BLD: jax.Array, t: int, cos_LD: jax.Array, sin_LD: jax.Array, kv_mode: str,
                 ref_kv: tuple[jax.Array, jax.Array] | None, out_bias: bool = True, n_valid: int | None = None
                 ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        """`s_BLD`: the modulated joint stream `[text ; image]` (`t` text tokens first); `cos_LD` / `sin_LD`: the
        RoPE tables of the whole stream (the text rows are cos 1, sin 0, which leaves those tokens exactly as
        they are). `n_valid`: where the stream carries padding rows after its first `n_valid`, those are masked
        out as keys. Returns the attention output of the joint stream and, for "write", the image tokens' K/V."""
        b, length, _ = s_BLD.shape

        def heads(x):
            return x.reshape(b, length, self.heads, self.head_dim)

        # the q / k biases are applied inside the norm + RoPE op, whose backward pass also gives their gradients
        q = heads(qk_norm_rope(self.to_q(s_BLD, bias=False), self.to_q.bias_value(), cos_LD, sin_LD))
        k = heads(qk_norm_rope(self.to_k(s_BLD, bias=False), self.to_k.bias_value(), cos_LD, sin_LD))
        v = heads(self.to_v(s_BLD))
        stored = (k[:, t:n_valid], v[:, t:n_valid]) if kv_mode == "write" else None
        n_keys = n_valid
        if kv_mode == "read":
            k_ref, v_ref = ref_kv
            k = jnp.concatenate([_expand_ref(k_ref, b).astype(k.dtype), k], axis=1)
            v = jnp.concatenate([_expand_ref(v_ref, b).astype(v.dtype), v], axis=1)
            n_keys = None if n_valid is None else k_ref.shape[1] + n_valid
        # under a mesh: q / k / v split by samples (and heads over `tensor`), as cuDNN's partitioner requires
        q, k, v = (constrain(x, QKV_AXES) for x in (q, k, v))
        # split by samples like q / k / v: cuDNN's partitioner hands each device its share of every operand
        kv_len = None if n_keys is None else constrain(jnp.full((b,), n_keys, jnp.int32), QKV_AXES[:1])
        o = jax.nn.dot_product_attention(q, k, v, scale=self.head_dim ** -0.5, key_value_seq_lengths=kv_len,
                                         implementation=self.implementation)
        return self.to_out(o.astype(q.dtype).reshape(b, length, self.heads * self.head_dim), bias=out_bias), stored


class Block(nnx.Module):
    """`GlmImageTransformerBlock`: adaLN-zero modulated joint attention + FF, shared weights for both streams."""

    def __init__(self, cfg: DiTConfig, *, implementation: str | None, dtype: DType, param_dtype: DType,
                 rngs: nnx.Rngs):
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        self.norm1 = AdaLNZero(cfg, **kw)
        self.attn1 = Attention(cfg, implementation=implementation, **kw)
        self.ff = feed_forward(cfg.inner_dim, cfg.ff_dim, cfg.inner_dim, _gelu_tanh,
                               axes=(("embed", "mlp"), ("mlp", "embed")), **kw)

    def __call__(self, x_BLD: jax.Array, t: int, temb_BE: jax.Array, cos_LD: jax.Array, sin_LD: jax.Array,
                 kv_mode: str, ref_kv, n_valid: int | None = None) -> tuple[jax.Array, Any]:
        """One block on the joint stream `x_BLD = [text ; image]` (`t` text tokens first; with `n_valid`, padding
        rows after the first `n_valid`, masked out of the attention's keys).

        Both streams share every projection, so they go through the matmuls together; only the modulation
        differs per stream. The modulation, gated residuals, qk norm + RoPE and GELU are the `dit_ops` ops
        (hand-written backward passes, Pallas kernels on GPU); the biases of `to_q`, `to_k`, `to_out`,
        `ff.proj_in` and `ff.proj_out` are applied inside those ops."""
        m = self.norm1(temb_BE)
        # per-stream vectors [B, 2, D]: row 0 text, row 1 image (norm1's chunks come image first)
        (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp) = (
            jnp.stack([m[i + 1], m[i]], axis=1) for i in (0, 2, 4, 6, 8, 10))
        attn, ff = self.attn1, self.ff
        u, x_res = modulate_split(x_BLD, shift_msa, scale_msa, t)
        o, stored = attn(u, t, cos_LD, sin_LD, kv_mode, ref_kv, out_bias=False, n_valid=n_valid)
        x_BLD = gated_residual(x_res, o, attn.to_out.bias_value(), gate_msa, t)
        u, x_res = modulate_split(x_BLD, shift_mlp, scale_mlp, t)
        f = ff.proj_out(bias_gelu(ff.proj_in(u, bias=False), ff.proj_in.bias_value()), bias=False)
        return gated_residual(x_res, f, ff.proj_out.bias_value(), gate_mlp, t), stored


class NormOut(nnx.Module):
    """`norm_out`: `LN(x)(1 + scale) + shift` with `[scale; shift] = linear(temb)` (scale first)."""

    def __init__(self, cfg: DiTConfig, *, dtype: DType, param_dtype: DType, rngs: nnx.Rngs):
        self.dtype = dtype
        self.linear = Dense(cfg.time_embed_dim, 2 * cfg.inner_dim, axes=("time", "embed"), dtype=dtype,
                            param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x_BND: jax.Array, temb_BE: jax.Array) -> jax.Array:
        scale, shift = jnp.split(self.linear(temb_BE.astype(self.dtype)), 2, axis=-1)
        return _modulate(x_BND, shift, scale)


class ImageProjector(nnx.Module):
    """`image_projector`: patchify (`(c, py, px)` features) then `proj` to the model width."""

    def __init__(self, cfg: DiTConfig, *, dtype: DType, param_dtype: DType, rngs: nnx.Rngs):
        self.patch_size = cfg.patch_size
        self.proj = Dense(cfg.in_channels * cfg.patch_size ** 2, cfg.inner_dim, axes=("latent", "embed"),
                          dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x_BHWC: jax.Array) -> jax.Array:
        return self.proj(patchify(x_BHWC, self.patch_size))


class GlmImageDiT(nnx.Module):
    """The GLM-Image flow-matching DiT; `__call__` predicts the velocity `[B, H', W', C]` (channels-last).

    `dtype` is the compute dtype (residual stream, matmuls); sincos embeddings, LayerNorm statistics, RoPE,
    activations and the attention softmax run in float32. `attention` picks the `jax.nn.dot_product_attention`
    implementation (None, "xla" or "cudnn"; cuDNN needs a half-precision `dtype`). `remat` names the
    rematerialisation policy of each block for training (`glm_jax.models.remat`: none / full / dots /
    dots_attention / dots_all).
    """

    def __init__(self, cfg: DiTConfig, *, dtype: DType = jnp.float32, param_dtype: DType = jnp.float32,
                 attention: str | None = None, remat: str = "none", rngs: nnx.Rngs):
        self.cfg, self.dtype = cfg, dtype
        self.remat = check_policy(remat)
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        d = cfg.inner_dim
        self.image_projector = ImageProjector(cfg, **kw)
        self.glyph_projector = feed_forward(cfg.text_embed_dim, d, d, _gelu_exact,
                                            axes=(("cond", "mlp"), ("mlp", "embed")), **kw)
        self.prior_token_embedding = Embedding(cfg.prior_vq_quantizer_codebook_size, d, axes=("codebook", "embed"),
                                               **kw)
        self.prior_projector = feed_forward(d, d, d, _silu, axes=(("embed", "mlp"), ("mlp", "embed")), **kw)
        self.time_condition_embed = TimeConditionEmbed(cfg, **kw)
        self.transformer_blocks = nnx.List([Block(cfg, implementation=attention, **kw)
                                            for _ in range(cfg.num_layers)])
        self.norm_out = NormOut(cfg, **kw)
        self.proj_out = Dense(d, cfg.patch_size ** 2 * cfg.out_channels, axes=("embed", "latent"), **kw)

    def padded_length(self, length: int) -> int:
        """The rows the blocks run on for a joint stream of `length` tokens: `dit_ops.round_rows(length)` (the next
        multiple of 8) where the fused GPU ops need it (`dit_ops.kernel_length`) or where the attention is cuDNN's
        (its backward pass rejects odd lengths), else `length`. The extra rows are masked out of the attention's
        keys and dropped."""
        if any(block.attn1.implementation == "cudnn" for block in self.transformer_blocks):
            return round_rows(length)
        return kernel_length(length, self.cfg.inner_dim)

    def __call__(self, latents_BHWC: jax.Array, glyph_BTD: jax.Array, prior_ids_BN: jax.Array,
                 prior_drop_BN: jax.Array, timestep_B: jax.Array, target_size_B2: jax.Array,
                 crop_coords_B2: jax.Array, *, kv_mode: str = "none", ref_kv: Any = None
                 ) -> tuple[jax.Array, Any]:
        """Velocity `[B, H', W', out_channels]` and, for `kv_mode="write"`, the per-layer reference K/V.

        `glyph_BTD`: projected-from glyph embeddings (T may be 0); `prior_ids_BN`: AR codes upsampled to the token
        grid (raster); `prior_drop_BN`: True zeroes that token's prior embedding; `timestep_B`: the DiT timestep
        (pipeline: `t - 1`, reference pass 0); `target_size_B2` `(H, W)` and `crop_coords_B2` `(top, left)` in
        pixels. `ref_kv` (mode "read"): a list over layers of `(k, v)` `[B_r, S_ref, heads, head_dim]`.
        Returns `(out, kv)` with `kv` None unless writing.
        """
        if kv_mode not in KV_MODES:
            raise ValueError(f"kv_mode={kv_mode!r}; expected one of {KV_MODES}")
        cfg = self.cfg
        if kv_mode == "read" and (ref_kv is None or len(ref_kv) != cfg.num_layers):
            raise ValueError(f"kv_mode='read' needs ref_kv with one (k, v) per layer ({cfg.num_layers})")
        _, h, w, _ = latents_BHWC.shape
        p = cfg.patch_size
        hp, wp = h // p, w // p
        cos, sin = rope_2d(hp, wp, cfg.attention_head_dim)

        img = self.image_projector(latents_BHWC.astype(self.dtype))
        txt = self.glyph_projector(glyph_BTD.astype(self.dtype))
        prior = self.prior_token_embedding(prior_ids_BN)
        prior = jnp.where(prior_drop_BN[..., None], jnp.zeros((), prior.dtype), prior)
        img = constrain(img + self.prior_projector(prior), STREAM_AXES)
        txt = constrain(txt, STREAM_AXES)
        temb = self.time_condition_embed(timestep_B, target_size_B2, crop_coords_B2)

        # the blocks run on the joint stream [text ; image]; RoPE rows of the text tokens are the identity
        t = txt.shape[1]
        cos = jnp.concatenate([jnp.ones((t, cos.shape[1]), cos.dtype), cos])
        sin = jnp.concatenate([jnp.zeros((t, sin.shape[1]), sin.dtype), sin])
        x = jnp.concatenate([txt, img], axis=1)
        # padding rows (zeros, RoPE identity) masked out of the attention's keys and dropped below: no value or
        # gradient changes (`padded_length`)
        length = x.shape[1]
        padded = self.padded_length(length)
        n_valid = None
        if padded > length:
            extra = padded - length
            x = jnp.pad(x, ((0, 0), (0, extra), (0, 0)))
            cos = jnp.concatenate([cos, jnp.ones((extra, cos.shape[1]), cos.dtype)])
            sin = jnp.concatenate([sin, jnp.zeros((extra, sin.shape[1]), sin.dtype)])
            n_valid = length
        stored = []
        for i, block in enumerate(self.transformer_blocks):
            layer_ref = ref_kv[i] if kv_mode == "read" else None
            x, kv = layer_call(block, self.remat, x, t, temb, cos, sin, kv_mode, layer_ref, n_valid,
                               static_argnums=(1, 5, 7))
            x = constrain(x, STREAM_AXES)
            stored.append(kv)

        out = self.proj_out(self.norm_out(x[:, t:length], temb))
        return unpatchify(out, hp, wp, p), (stored if kv_mode == "write" else None)


def dit_flops(cfg: DiTConfig, n_img: int, n_txt: int, n_ref: int = 0) -> float:
    """Matmul FLOPs (2 per multiply-add) of one DiT forward of ONE sample (brief §8); multiply by the batch.

    Per block: `2 (N+T)(4 d^2 + 2 d ff)` (QKV, out, FF) + `4 (N+T)(N+T+M) d` (scores and values, M cached
    reference keys) + `2 e 12 d` (adaLN); plus the image / prior projectors on N tokens, the glyph projector on T
    tokens and `proj_out`. The time/condition MLPs and `norm_out` are negligible and left out, as in the brief.
    Real config at 1024^2 (N = 4096, T = 1): 58.0 TFLOP.
    """
    d, n, t, m = cfg.inner_dim, n_img, n_txt, n_ref
    per_token = 2 * (4 * d * d + 2 * d * cfg.ff_dim)
    block = (n + t) * per_token + 4 * (n + t) * (n + t + m) * d + 2 * cfg.time_embed_dim * 12 * d
    patch_in = cfg.in_channels * cfg.patch_size ** 2
    patch_out = cfg.out_channels * cfg.patch_size ** 2
    return float(cfg.num_layers * block + n * 2 * (patch_in * d + 2 * d * d)
                 + t * 2 * (cfg.text_embed_dim * d + d * d) + n * 2 * patch_out * d)
