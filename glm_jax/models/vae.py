"""GLM-Image's VAE: diffusers `AutoencoderKL` (`models/autoencoders/autoencoder_kl.py`, `vae.py`), channels-last.

Layout (all activations NHWC, conv kernels HWIO `(kh, kw, in, out)`, GroupNorm eps 1e-6, groups of contiguous
channels, statistics in float32):

    ResnetBlock2D(x) = shortcut(x) + conv2(silu(GN2(conv1(silu(GN1(x))))))   shortcut = 1x1 conv iff channels change
    Encoder: conv_in -> down_blocks[b] = layers_per_block resnets (+ Downsample2D except the last block)
             -> mid_block (2 resnets, no attention) -> GN -> silu -> conv_out (2 * latent channels)
    Decoder: conv_in -> mid_block -> up_blocks[b] = layers_per_block + 1 resnets (+ Upsample2D except the last)
             -> GN -> silu -> conv_out
    Downsample2D: zero-pad bottom/right by 1, then 3x3 stride-2 VALID conv (diffusers' `padding=0` rule)
    Upsample2D:   nearest x2, then 3x3 conv with padding 1

`encode_mean` returns the posterior mean (first half of the encoder's conv_out channels), which is what
`retrieve_latents(..., sample_mode="argmax")` gives the GLM-Image pipeline; the log-variance half is dropped.
The pipeline's latent normalisation is per channel with the config's `latents_mean` / `latents_std`
(`normalize` / `denormalize`); `scaling_factor` and `shift_factor` are unused by GLM-Image and ignored here.
Only the GLM-Image configuration family is supported: no mid-block attention, no quant / post-quant convs, SiLU.

Parameter paths mirror the torch names with `weight` -> `kernel` for convs, e.g.
`encoder.down_blocks.{b}.resnets.{i}.conv1.kernel`, `encoder.down_blocks.{b}.downsamplers.0.conv.kernel`,
`decoder.up_blocks.{b}.upsamplers.0.conv.kernel`, `decoder.mid_block.resnets.{i}.norm1.weight`,
so `conversion/tables/vae.py` is a rename plus the CONV transform.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from glm_jax.models.layers import DType, param

GN_EPS = 1e-6
_DIMS = ("NHWC", "HWIO", "NHWC")
_DOWN_BLOCK, _UP_BLOCK = "DownEncoderBlock2D", "UpDecoderBlock2D"


@dataclass(frozen=True)
class VAEConfig:
    """Sizes of an `AutoencoderKL` read from a diffusers `vae/config.json`."""

    in_channels: int
    out_channels: int
    latent_channels: int
    block_out_channels: tuple[int, ...]
    layers_per_block: int
    norm_num_groups: int
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None

    @classmethod
    def from_hf(cls, d: dict) -> VAEConfig:
        """Reads a diffusers `AutoencoderKL` config dict; missing keys take diffusers' class defaults.

        Raises `ValueError` naming the field for anything outside the supported family (mid-block attention,
        quant / post-quant convs, a non-SiLU activation, other block types, inconsistent sizes).
        """
        def unsupported(field: str, value, want) -> ValueError:
            return ValueError(f"vae config.json: {field}={value!r} is not supported (only {want!r}: the GLM-Image "
                              f"VAE has no such layers)")

        if d.get("mid_block_add_attention", True):
            raise unsupported("mid_block_add_attention", d.get("mid_block_add_attention", True), False)
        for key in ("use_quant_conv", "use_post_quant_conv"):
            if d.get(key, True):
                raise unsupported(key, d.get(key, True), False)
        if d.get("act_fn", "silu") != "silu":
            raise ValueError(f"vae config.json: act_fn={d['act_fn']!r} is not supported (only 'silu')")
        block_out = tuple(int(c) for c in d.get("block_out_channels", (64,)))
        n = len(block_out)
        for key, want in (("down_block_types", _DOWN_BLOCK), ("up_block_types", _UP_BLOCK)):
            types = tuple(d.get(key, (want,)))
            if len(types) != n or any(t != want for t in types):
                raise ValueError(f"vae config.json: {key}={list(types)} must be {n} x {want!r} "
                                 f"(one per block_out_channels entry)")
        groups = int(d.get("norm_num_groups", 32))
        if any(c % groups for c in block_out):
            raise ValueError(f"vae config.json: norm_num_groups={groups} does not divide block_out_channels "
                             f"{list(block_out)}")
        latent = int(d.get("latent_channels", 4))
        stats = {}
        for key in ("latents_mean", "latents_std"):
            v = d.get(key)
            if v is not None:
                v = tuple(float(x) for x in v)
                if len(v) != latent:
                    raise ValueError(f"vae config.json: {key} has {len(v)} entries, latent_channels is {latent}")
            stats[key] = v
        return cls(in_channels=int(d.get("in_channels", 3)), out_channels=int(d.get("out_channels", 3)),
                   latent_channels=latent, block_out_channels=block_out,
                   layers_per_block=int(d.get("layers_per_block", 1)), norm_num_groups=groups, **stats)


def conv2d(x_BHWC: jax.Array, kernel_HWIO: jax.Array, bias_O: jax.Array, *, stride: int,
           padding: str | tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
    """2-D convolution, NHWC activations and HWIO kernel, computed in the dtype of `x_BHWC`."""
    y = jax.lax.conv_general_dilated(x_BHWC, kernel_HWIO.astype(x_BHWC.dtype), (stride, stride), padding,
                                     dimension_numbers=_DIMS)
    return y + bias_O.astype(x_BHWC.dtype)


def group_norm(x_BHWC: jax.Array, weight_C: jax.Array, bias_C: jax.Array, groups: int, eps: float) -> jax.Array:
    """torch `nn.GroupNorm` on NHWC: group g holds channels [g*C/G, (g+1)*C/G); float32 statistics and affine."""
    B, H, W, C = x_BHWC.shape
    x = x_BHWC.astype(jnp.float32).reshape(B, H, W, groups, C // groups)
    mean = jnp.mean(x, axis=(1, 2, 4), keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=(1, 2, 4), keepdims=True)
    y = ((x - mean) * jax.lax.rsqrt(var + eps)).reshape(B, H, W, C)
    y = y * weight_C.astype(jnp.float32) + bias_C.astype(jnp.float32)
    return y.astype(x_BHWC.dtype)


def upsample_nearest2x(x_BHWC: jax.Array) -> jax.Array:
    """Nearest-neighbour x2 upsampling (torch `F.interpolate(scale_factor=2, mode="nearest")`)."""
    B, H, W, C = x_BHWC.shape
    y = jnp.broadcast_to(x_BHWC[:, :, None, :, None, :], (B, H, 2, W, 2, C))
    return y.reshape(B, 2 * H, 2 * W, C)


class Conv2d(nnx.Module):
    """`nn.Conv2d` with bias, padding `size // 2` (or VALID); kernel HWIO (axes conv_h, conv_w, conv_in, conv_out)."""

    def __init__(self, in_ch: int, out_ch: int, size: int, *, stride: int = 1, valid: bool = False,
                 dtype: DType, param_dtype: DType, rngs: nnx.Rngs):
        self.stride = stride
        self.padding = "VALID" if valid else ((size // 2, size // 2),) * 2
        self.dtype = dtype
        self.kernel = param(rngs, (size, size, in_ch, out_ch), ("conv_h", "conv_w", "conv_in", "conv_out"),
                            param_dtype)
        self.bias = param(rngs, (out_ch,), ("conv_out",), param_dtype, jax.nn.initializers.zeros)

    def __call__(self, x_BHWC: jax.Array) -> jax.Array:
        return conv2d(x_BHWC.astype(self.dtype), self.kernel[...], self.bias[...], stride=self.stride,
                      padding=self.padding)


class GroupNorm(nnx.Module):
    """Affine GroupNorm (eps 1e-6) whose output is cast to the input dtype."""

    def __init__(self, channels: int, groups: int, *, param_dtype: DType, rngs: nnx.Rngs):
        self.groups = groups
        self.weight = param(rngs, (channels,), ("norm",), param_dtype, jax.nn.initializers.ones)
        self.bias = param(rngs, (channels,), ("norm",), param_dtype, jax.nn.initializers.zeros)

    def __call__(self, x_BHWC: jax.Array) -> jax.Array:
        return group_norm(x_BHWC, self.weight[...], self.bias[...], self.groups, GN_EPS)


class ResnetBlock2D(nnx.Module):
    """diffusers `ResnetBlock2D` without time embedding (output_scale_factor 1, dropout 0)."""

    def __init__(self, in_ch: int, out_ch: int, groups: int, *, dtype: DType, param_dtype: DType,
                 rngs: nnx.Rngs):
        kw = {"param_dtype": param_dtype, "rngs": rngs}
        self.norm1 = GroupNorm(in_ch, groups, **kw)
        self.conv1 = Conv2d(in_ch, out_ch, 3, dtype=dtype, **kw)
        self.norm2 = GroupNorm(out_ch, groups, **kw)
        self.conv2 = Conv2d(out_ch, out_ch, 3, dtype=dtype, **kw)
        self.conv_shortcut = Conv2d(in_ch, out_ch, 1, dtype=dtype, **kw) if in_ch != out_ch else None

    def __call__(self, x_BHWC: jax.Array) -> jax.Array:
        h = self.conv1(jax.nn.silu(self.norm1(x_BHWC)))
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        skip = x_BHWC if self.conv_shortcut is None else self.conv_shortcut(x_BHWC)
        return skip.astype(h.dtype) + h


class Downsample2D(nnx.Module):
    """Zero-pad bottom and right by one pixel, then a 3x3 stride-2 VALID conv: (H, W) -> (H // 2, W // 2)."""

    def __init__(self, ch: int, *, dtype: DType, param_dtype: DType, rngs: nnx.Rngs):
        self.conv = Conv2d(ch, ch, 3, stride=2, valid=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x_BHWC: jax.Array) -> jax.Array:
        return self.conv(jnp.pad(x_BHWC, ((0, 0), (0, 1), (0, 1), (0, 0))))


class Upsample2D(nnx.Module):
    """Nearest x2, then a 3x3 conv (padding 1)."""

    def __init__(self, ch: int, *, dtype: DType, param_dtype: DType, rngs: nnx.Rngs):
        self.conv = Conv2d(ch, ch, 3, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x_BHWC: jax.Array) -> jax.Array:
        return self.conv(upsample_nearest2x(x_BHWC))


def _resnets(in_ch: int, out_ch: int, num: int, groups: int, **kw) -> nnx.List:
    """`num` resnets, the first mapping `in_ch` -> `out_ch`."""
    return nnx.List([ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, groups, **kw) for i in range(num)])


class DownEncoderBlock2D(nnx.Module):
    """Resnets, then an optional `Downsample2D` (in `downsamplers`, a list of zero or one, like the torch keys)."""

    def __init__(self, in_ch: int, out_ch: int, num: int, groups: int, *, downsample: bool, dtype: DType,
                 param_dtype: DType, rngs: nnx.Rngs):
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        self.resnets = _resnets(in_ch, out_ch, num, groups, **kw)
        self.downsamplers = nnx.List([Downsample2D(out_ch, **kw)] if downsample else [])

    def __call__(self, x_BHWC: jax.Array) -> jax.Array:
        for layer in (*self.resnets, *self.downsamplers):
            x_BHWC = layer(x_BHWC)
        return x_BHWC


class UpDecoderBlock2D(nnx.Module):
    """Resnets, then an optional `Upsample2D` (in `upsamplers`, a list of zero or one)."""

    def __init__(self, in_ch: int, out_ch: int, num: int, groups: int, *, upsample: bool, dtype: DType,
                 param_dtype: DType, rngs: nnx.Rngs):
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        self.resnets = _resnets(in_ch, out_ch, num, groups, **kw)
        self.upsamplers = nnx.List([Upsample2D(out_ch, **kw)] if upsample else [])

    def __call__(self, x_BHWC: jax.Array) -> jax.Array:
        for layer in (*self.resnets, *self.upsamplers):
            x_BHWC = layer(x_BHWC)
        return x_BHWC


class MidBlock2D(nnx.Module):
    """`UNetMidBlock2D` with `add_attention=False`: two resnets at constant width."""

    def __init__(self, ch: int, groups: int, *, dtype: DType, param_dtype: DType, rngs: nnx.Rngs):
        self.resnets = _resnets(ch, ch, 2, groups, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x_BHWC: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x_BHWC = resnet(x_BHWC)
        return x_BHWC


class Encoder(nnx.Module):
    """diffusers `Encoder` (double_z): images `(B, H, W, in)` -> moments `(B, H/f, W/f, 2 * latent)`."""

    def __init__(self, cfg: VAEConfig, *, dtype: DType, param_dtype: DType, rngs: nnx.Rngs):
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        chans, g, n = cfg.block_out_channels, cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = Conv2d(cfg.in_channels, chans[0], 3, **kw)
        self.down_blocks = nnx.List([
            DownEncoderBlock2D(chans[max(b - 1, 0)], chans[b], cfg.layers_per_block, g, downsample=b < n - 1, **kw)
            for b in range(n)])
        self.mid_block = MidBlock2D(chans[-1], g, **kw)
        self.conv_norm_out = GroupNorm(chans[-1], g, param_dtype=param_dtype, rngs=rngs)
        self.conv_out = Conv2d(chans[-1], 2 * cfg.latent_channels, 3, **kw)

    def __call__(self, x_BHWC: jax.Array) -> jax.Array:
        h = self.conv_in(x_BHWC)
        for block in self.down_blocks:
            h = block(h)
        h = self.mid_block(h)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(h)))


class Decoder(nnx.Module):
    """diffusers `Decoder` (group norm): latents `(B, h, w, latent)` -> images `(B, h*f, w*f, out)`."""

    def __init__(self, cfg: VAEConfig, *, dtype: DType, param_dtype: DType, rngs: nnx.Rngs):
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        rev, g, n = cfg.block_out_channels[::-1], cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = Conv2d(cfg.latent_channels, rev[0], 3, **kw)
        self.mid_block = MidBlock2D(rev[0], g, **kw)
        self.up_blocks = nnx.List([
            UpDecoderBlock2D(rev[max(b - 1, 0)], rev[b], cfg.layers_per_block + 1, g, upsample=b < n - 1, **kw)
            for b in range(n)])
        self.conv_norm_out = GroupNorm(rev[-1], g, param_dtype=param_dtype, rngs=rngs)
        self.conv_out = Conv2d(rev[-1], cfg.out_channels, 3, **kw)

    def __call__(self, z_BhwC: jax.Array) -> jax.Array:
        h = self.mid_block(self.conv_in(z_BhwC))
        for block in self.up_blocks:
            h = block(h)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(h)))


class AutoencoderKL(nnx.Module):
    """GLM-Image VAE, NHWC. `encode_mean`: images in [-1, 1] -> posterior mean; `decode`: latents -> images.

    `dtype` is the compute dtype (float32 or bfloat16; float16 overflows in the real decoder); GroupNorm
    statistics are always float32. Spatial downsampling factor is `2 ** (len(block_out_channels) - 1)`.
    """

    def __init__(self, cfg: VAEConfig, *, dtype: DType = jnp.float32, param_dtype: DType = jnp.float32,
                 rngs: nnx.Rngs):
        self.cfg = cfg
        self.dtype = dtype
        self.encoder = Encoder(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.decoder = Decoder(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    @property
    def scale_factor(self) -> int:
        return 2 ** (len(self.cfg.block_out_channels) - 1)

    def encode_mean(self, images_BHWC: jax.Array) -> jax.Array:
        """Posterior mean `(B, H', W', latent)` of images in [-1, 1]; each downsample floors: H -> H // 2."""
        moments = self.encoder(images_BHWC.astype(self.dtype))
        return moments[..., :self.cfg.latent_channels]

    def decode(self, latents_BhwC: jax.Array) -> jax.Array:
        """Images `(B, h*f, w*f, out)` in about [-1, 1] (not clamped) from unnormalised latents."""
        return self.decoder(latents_BhwC.astype(self.dtype))

    def _stats(self) -> tuple[jax.Array, jax.Array]:
        if self.cfg.latents_mean is None or self.cfg.latents_std is None:
            raise ValueError("vae config.json has no latents_mean / latents_std; GLM-Image needs both")
        return (jnp.asarray(self.cfg.latents_mean, jnp.float32), jnp.asarray(self.cfg.latents_std, jnp.float32))

    def normalize(self, z_BhwC: jax.Array) -> jax.Array:
        """Pipeline latent normalisation `(z - mean_c) / std_c` (per channel, last axis), in z's dtype.

        XLA compiles the division by a per-channel vector as a multiply by its reciprocal, so results may differ
        from torch by an ulp."""
        mean, std = self._stats()
        return (z_BhwC - mean.astype(z_BhwC.dtype)) / std.astype(z_BhwC.dtype)

    def denormalize(self, z_BhwC: jax.Array) -> jax.Array:
        """Inverse of `normalize`: `z * std_c + mean_c`, applied before `decode`."""
        mean, std = self._stats()
        return z_BhwC * std.astype(z_BhwC.dtype) + mean.astype(z_BhwC.dtype)


def to_uint8(images_BHWC: jax.Array) -> jax.Array:
    """Decoded images in [-1, 1] -> uint8, as `VaeImageProcessor.postprocess(output_type="pil")` computes it:
    `(x * 0.5 + 0.5).clamp(0, 1)` in the image dtype, then float32 `(x * 255).round()` (half to even)."""
    y = jnp.clip(images_BHWC * 0.5 + 0.5, 0, 1).astype(jnp.float32)
    return jnp.round(y * 255).astype(jnp.uint8)
