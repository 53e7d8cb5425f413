"""Image editing (I2I) GRPO: prompts with source images. Variants: tiny | ar | dit | both | lora | full.

Pair a target reward with the `structure` regulariser, e.g.
`--config.reward.dit="{'lpips': 1.0, 'structure': 0.2}"`.
"""

from glm_jax.config import apply_variants, base_config


def get_config(arg=None):
    c = base_config()
    c.mode = "i2i"
    c.data.path = "data/i2i"
    c.reward.ar = {"lpips": 1.0}
    c.reward.dit = {"lpips": 1.0, "structure": 0.2}
    return apply_variants(c, arg)
