"""glm_jax: GRPO reward fine-tuning of GLM-Image (autoregressive + diffusion decoder) in JAX/Flax NNX."""

__version__ = "0.1.0"
