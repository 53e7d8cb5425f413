"""Image editing (I2I) GRPO: prompts with source images. Variants: tiny | ar | dit | both | lora | full.

    python -m glm_jax.train --config configs/i2i.py:dit,lora --workdir runs/i2i-dit \
        --config.model.ckpt=ckpt/glm-image --config.data.path=data/my_i2i

Every example of a run needs the same number of source images; sources are resized to the target size
(`image.height x image.width`) when they differ (see docs/training.md). Pair a target reward with the `structure`
regulariser (SSIM of edges against the first source), e.g. `--config.reward.dit="{'lpips': 1.0, 'structure': 0.2}"`.
"""

from glm_jax.config import apply_variants, base_config


def get_config(arg=None):
    c = base_config()
    c.mode = "i2i"
    c.data.path = "data/i2i"
    c.reward.ar = {"lpips": 1.0}
    c.reward.dit = {"lpips": 1.0, "structure": 0.2}
    return apply_variants(c, arg)
