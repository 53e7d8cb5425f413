"""GLM-Image source-image tokenizer: the ViT (`model.visual`) and the VQ quantizer (`model.vqmodel`) in Flax NNX.

Used only for I2I: each source image, as patch rows `[N, C*p*p]` (raster order, rows flattened in `(C, p, p)`
order as the HF image processor makes them), becomes `gh*gw` discrete codes that replace the `<|image|>`
placeholders of the AR prompt.

ViT (`GlmImageVisionModel`):
    x   = patch_embed(pixels)                 Conv2d(k = s = p) == a dense layer over the (C, p, p) row
    x  += resample(pos_table)                 learned (S, S, D) table, S = image_size / p, bilinearly sampled at
                                              ((r + 0.5) S / gh - 0.5, (c + 0.5) S / gw - 0.5), border-clamped,
                                              no antialias (torch `grid_sample`, align_corners=False), in fp32
    per block: x += proj(attn(LN1(x)));  x += fc2(gelu(fc1(LN2(x))))     LayerNorm with affine, exact GELU,
               fused qkv split (q, k, v) then heads; attention is non-causal and block-diagonal: a patch only
               attends to patches of its own image
    no final norm: the last block's output is the feature.

VQ (`GlmImageVQVAE`, only `quant_conv` + `quantize` are used):
    z = quant_conv(feature) (1x1 conv),  id = argmin ||ẑ - ê||² over the codebook, with ẑ, ê L2-normalised
    (computed as HF does, ẑ² + ê² - 2 ẑ·ê, so ties break the same way). `post_quant_conv` is kept as a
    parameter only so that checkpoints round-trip: nothing uses it.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from glm_jax.models.layers import Dense, DType, LayerNorm, param

Grids = tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class VisionConfig:
    """ViT sizes from the HF `vision_config` dict (missing keys take the transformers class defaults)."""

    depth: int = 40
    hidden_size: int = 1536
    num_heads: int = 16
    intermediate_size: int = 6144
    image_size: int = 2048
    patch_size: int = 16
    in_channels: int = 3
    layer_norm_eps: float = 1e-6
    attention_bias: bool = True
    hidden_act: str = "gelu"
    spatial_merge_size: int = 1

    @classmethod
    def from_hf(cls, d: dict) -> VisionConfig:
        """Reads a `GlmImageVisionConfig` dict."""
        kw = {f: d[f] for f in cls.__dataclass_fields__ if f in d}
        for alias, name in (("num_hidden_layers", "depth"), ("num_attention_heads", "num_heads")):
            if alias in d and name not in d:
                kw[name] = d[alias]
        cfg = cls(**kw)
        if cfg.hidden_act not in ("gelu", "gelu_pytorch_tanh"):
            raise ValueError(f"vision_config.hidden_act={cfg.hidden_act!r} is not supported (gelu)")
        if cfg.spatial_merge_size != 1:
            raise ValueError(f"vision_config.spatial_merge_size={cfg.spatial_merge_size} is not supported (1)")
        if cfg.hidden_size % cfg.num_heads:
            raise ValueError("vision_config.hidden_size must be a multiple of num_heads")
        return cfg

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def table_side(self) -> int:
        return self.image_size // self.patch_size


@dataclass(frozen=True)
class VQConfig:
    """VQ sizes from the HF `vq_config` dict."""

    embed_dim: int = 2048
    num_embeddings: int = 16384
    latent_channels: int = 1536
    in_channels: int = 3

    @classmethod
    def from_hf(cls, d: dict) -> VQConfig:
        """Reads a `GlmImageVQVAEConfig` dict."""
        return cls(**{f: d[f] for f in cls.__dataclass_fields__ if f in d})


def patchify(images_BHWC: np.ndarray, patch: int) -> np.ndarray:
    """Patch rows `[B * gh * gw, C * p * p]` of images whose sides are multiples of `patch`, raster order per
    image, each row flattened in (C, p, p) order (the HF GLM-Image image processor's layout, merge size 1)."""
    b, h, w, c = images_BHWC.shape
    if h % patch or w % patch:
        raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {patch}")
    x = images_BHWC.reshape(b, h // patch, patch, w // patch, patch, c)
    x = x.transpose(0, 1, 3, 5, 2, 4)                    # b, gh, gw, c, py, px
    return x.reshape(b * (h // patch) * (w // patch), c * patch * patch)


def resample_positions(table_SSD: jax.Array, gh: int, gw: int) -> jax.Array:
    """Bilinear, border-clamped, non-antialiased resampling of a `(S, S, D)` table to `(gh * gw, D)` (fp32),
    equal to torch `grid_sample(align_corners=False, padding_mode="border")` at patch centres."""
    s = table_SSD.shape[0]

    def taps(n):
        coord = (np.arange(n, dtype=np.float64) + 0.5) * s / n - 0.5
        coord = np.clip(coord, 0.0, s - 1)
        lo = np.floor(coord).astype(np.int32)
        hi = np.minimum(lo + 1, s - 1)
        frac = (coord - lo).astype(np.float32)
        return lo, hi, frac

    y0, y1, fy = taps(gh)
    x0, x1, fx = taps(gw)
    t = table_SSD.astype(jnp.float32)
    fy, fx = jnp.asarray(fy)[:, None, None], jnp.asarray(fx)[None, :, None]
    top = t[y0][:, x0] * (1 - fx) + t[y0][:, x1] * fx
    bot = t[y1][:, x0] * (1 - fx) + t[y1][:, x1] * fx
    out = top * (1 - fy) + bot * fy
    return out.reshape(gh * gw, -1)


def _segment_ids(grids: Grids) -> np.ndarray:
    return np.concatenate([np.full(h * w, i, np.int32) for i, (h, w) in enumerate(grids)])


class PatchEmbed(nnx.Module):
    """`patch_embed.proj`: the Conv2d kernel kept as HWIO, applied as a dense layer over (C, p, p) rows."""

    def __init__(self, cfg: VisionConfig, *, dtype: DType, param_dtype: DType, rngs: nnx.Rngs):
        p, c, d = cfg.patch_size, cfg.in_channels, cfg.hidden_size
        self.dtype, self.patch = dtype, p
        self.kernel = param(rngs, (p, p, c, d), ("conv_h", "conv_w", "conv_in", "embed"), param_dtype)
        self.bias = param(rngs, (d,), ("embed",), param_dtype, jax.nn.initializers.zeros)

    def __call__(self, rows_NP: jax.Array) -> jax.Array:
        k = self.kernel[...]
        kernel = jnp.transpose(k, (2, 0, 1, 3)).reshape(-1, k.shape[-1])   # (c, py, px) rows
        return rows_NP.astype(self.dtype) @ kernel.astype(self.dtype) + self.bias[...].astype(self.dtype)


class Embedding(nnx.Module):
    def __init__(self, num: int, dim: int, *, axes, param_dtype: DType, rngs: nnx.Rngs):
        self.embedding = param(rngs, (num, dim), axes, param_dtype)


class VisionAttention(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype: DType, param_dtype: DType, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.heads, self.head_dim = cfg.num_heads, cfg.head_dim
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        self.qkv = Dense(d, 3 * d, axes=("embed", "qkv"), use_bias=cfg.attention_bias, **kw)
        self.proj = Dense(d, d, axes=("heads", "embed"), use_bias=cfg.attention_bias, **kw)

    def __call__(self, x_ND: jax.Array, mask_NN: jax.Array) -> jax.Array:
        n = x_ND.shape[0]
        q, k, v = jnp.moveaxis(self.qkv(x_ND).reshape(n, 3, self.heads, self.head_dim), 1, 0)
        o = jax.nn.dot_product_attention(q[None], k[None], v[None], mask=mask_NN[None, None],
                                         scale=self.head_dim ** -0.5)
        return self.proj(o[0].reshape(n, -1))


class VisionMLP(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype: DType, param_dtype: DType, rngs: nnx.Rngs):
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        self.fc1 = Dense(cfg.hidden_size, cfg.intermediate_size, axes=("embed", "mlp"), **kw)
        self.fc2 = Dense(cfg.intermediate_size, cfg.hidden_size, axes=("mlp", "embed"), **kw)
        self.approximate = cfg.hidden_act == "gelu_pytorch_tanh"

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.fc1(x)
        h = jax.nn.gelu(h.astype(jnp.float32), approximate=self.approximate).astype(h.dtype)
        return self.fc2(h)


class VisionBlock(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype: DType, param_dtype: DType, rngs: nnx.Rngs):
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        self.norm1 = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, param_dtype=param_dtype, rngs=rngs)
        self.norm2 = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, param_dtype=param_dtype, rngs=rngs)
        self.attn = VisionAttention(cfg, **kw)
        self.mlp = VisionMLP(cfg, **kw)

    def __call__(self, x_ND: jax.Array, mask_NN: jax.Array) -> jax.Array:
        x_ND = x_ND + self.attn(self.norm1(x_ND), mask_NN)
        return x_ND + self.mlp(self.norm2(x_ND))


class Embeddings(nnx.Module):
    """`embeddings.position_embedding`: the `(S*S, D)` learned table."""

    def __init__(self, cfg: VisionConfig, *, param_dtype: DType, rngs: nnx.Rngs):
        self.side = cfg.table_side
        self.position_embedding = Embedding(self.side ** 2, cfg.hidden_size, axes=(None, "embed"),
                                            param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x_ND: jax.Array, grids: Grids) -> jax.Array:
        table = self.position_embedding.embedding[...]
        table = table.reshape(self.side, self.side, -1)
        pos = jnp.concatenate([resample_positions(table, h, w) for h, w in grids], axis=0)
        return x_ND + pos.astype(table.dtype).astype(x_ND.dtype)


class GlmImageVision(nnx.Module):
    """The GLM-Image ViT: `__call__(pixel_values [N, C*p*p], grids) -> features [N, hidden]` (static grids)."""

    def __init__(self, cfg: VisionConfig, *, dtype: DType = jnp.float32, param_dtype: DType = jnp.float32,
                 rngs: nnx.Rngs):
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        self.cfg = cfg
        self.embeddings = Embeddings(cfg, param_dtype=param_dtype, rngs=rngs)
        self.patch_embed = nnx.Dict(proj=PatchEmbed(cfg, **kw))
        self.blocks = nnx.List([VisionBlock(cfg, **kw) for _ in range(cfg.depth)])

    def __call__(self, pixel_values_NP: jax.Array, grids: Grids) -> jax.Array:
        grids = tuple((int(h), int(w)) for h, w in grids)
        n = sum(h * w for h, w in grids)
        if pixel_values_NP.shape[0] != n:
            raise ValueError(f"pixel_values has {pixel_values_NP.shape[0]} rows, the grids {grids} need {n}")
        x = self.patch_embed["proj"](pixel_values_NP)
        x = self.embeddings(x, grids)
        seg = jnp.asarray(_segment_ids(grids))
        mask = seg[:, None] == seg[None, :]
        for block in self.blocks:
            x = block(x, mask)
        return x


class Quantize(nnx.Module):
    def __init__(self, cfg: VQConfig, *, param_dtype: DType, rngs: nnx.Rngs):
        self.embedding = Embedding(cfg.num_embeddings, cfg.embed_dim, axes=("codebook", "latent"),
                                   param_dtype=param_dtype, rngs=rngs)


class Conv1x1(nnx.Module):
    """A 1x1 Conv2d kept as an HWIO kernel `(1, 1, I, O)`."""

    def __init__(self, cin: int, cout: int, *, axes, dtype: DType, param_dtype: DType, rngs: nnx.Rngs):
        self.dtype = dtype
        self.kernel = param(rngs, (1, 1, cin, cout), (None, None, *axes), param_dtype)
        self.bias = param(rngs, (cout,), (axes[1],), param_dtype, jax.nn.initializers.zeros)

    def __call__(self, x_NI: jax.Array) -> jax.Array:
        return x_NI.astype(self.dtype) @ self.kernel[...][0, 0].astype(self.dtype) + self.bias[...].astype(self.dtype)


class GlmImageVQ(nnx.Module):
    """The VQ tokenizer: `encode(features [N, hidden], grids) -> codes [N] int32` (raster order per image)."""

    def __init__(self, cfg: VQConfig, in_channels: int, *, dtype: DType = jnp.float32,
                 param_dtype: DType = jnp.float32, rngs: nnx.Rngs):
        if in_channels != cfg.latent_channels:
            raise ValueError(f"vq_config.latent_channels={cfg.latent_channels} must equal the vision hidden size "
                             f"{in_channels}")
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        self.quant_conv = Conv1x1(cfg.latent_channels, cfg.embed_dim, axes=("embed", "latent"), **kw)
        self.post_quant_conv = Conv1x1(cfg.embed_dim, cfg.latent_channels, axes=("latent", "embed"), **kw)
        self.quantize = Quantize(cfg, param_dtype=param_dtype, rngs=rngs)

    def encode(self, features_ND: jax.Array, grids: Grids | None = None) -> jax.Array:
        """Codes `[N]` (int32) of ViT features `[N, hidden]`, one per row, so raster order per image carries over.

        Every row is quantised on its own (1x1 conv, then nearest unit codebook vector), so `grids` is not needed
        for the math; it is accepted to mirror `GlmImageVision`. The normalisation and distances are computed in
        fp32 whatever `dtype` is (transformers would use the model dtype; fp32 avoids bf16 ties in the argmin).
        """
        z = self.quant_conv(features_ND).astype(jnp.float32)
        e = self.quantize.embedding.embedding[...].astype(jnp.float32)
        z = z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-12)
        e = e / jnp.maximum(jnp.linalg.norm(e, axis=-1, keepdims=True), 1e-12)
        dist = jnp.sum(z * z, -1, keepdims=True) + jnp.sum(e * e, -1)[None] - 2 * (z @ e.T)
        return jnp.argmin(dist, axis=-1).astype(jnp.int32)
