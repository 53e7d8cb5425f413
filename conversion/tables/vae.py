"""Key table between diffusers `AutoencoderKL` (the GLM-Image `vae`) and `glm_jax.models.vae`.

jax paths are the torch names with conv `weight` -> `kernel` (OIHW <-> HWIO); GroupNorm `weight` / `bias` and conv
biases are copied. `{b}` is a down/up block, `{i}` a resnet, `{n}` the (single) resampler index.
"""

from __future__ import annotations

from conversion.table import CONV, COPY, Rule


def _conv(name: str) -> list[Rule]:
    return [Rule(f"{name}.weight", f"{name}.kernel", CONV), Rule(f"{name}.bias", f"{name}.bias", COPY)]


def _norm(name: str) -> list[Rule]:
    return [Rule(f"{name}.weight", f"{name}.weight", COPY), Rule(f"{name}.bias", f"{name}.bias", COPY)]


def _resnet(prefix: str) -> list[Rule]:
    return [r for part in ("conv1", "conv2", "conv_shortcut") for r in _conv(f"{prefix}.{part}")] + \
        [r for part in ("norm1", "norm2") for r in _norm(f"{prefix}.{part}")]


RULES: list[Rule] = [
    *_conv("encoder.conv_in"),
    *_resnet("encoder.down_blocks.{b}.resnets.{i}"),
    *_conv("encoder.down_blocks.{b}.downsamplers.{n}.conv"),
    *_resnet("encoder.mid_block.resnets.{i}"),
    *_norm("encoder.conv_norm_out"),
    *_conv("encoder.conv_out"),
    *_conv("decoder.conv_in"),
    *_resnet("decoder.mid_block.resnets.{i}"),
    *_resnet("decoder.up_blocks.{b}.resnets.{i}"),
    *_conv("decoder.up_blocks.{b}.upsamplers.{n}.conv"),
    *_norm("decoder.conv_norm_out"),
    *_conv("decoder.conv_out"),
]
