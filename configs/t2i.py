"""Text-to-image GRPO. Variants (comma-separated after ':'): tiny | ar | dit | both | lora | full.

    python -m glm_jax.train --config configs/t2i.py:dit,lora --workdir runs/t2i-dit \
        --config.model.ckpt=ckpt/glm-image --config.data.path=data/my_t2i
    python -m glm_jax.train --config configs/t2i.py:tiny --workdir runs/tiny      # the embedded tiny model (CPU)
"""

from glm_jax.config import apply_variants, base_config


def get_config(arg=None):
    c = base_config()
    c.mode = "t2i"
    c.data.path = "data/t2i"
    return apply_variants(c, arg)
