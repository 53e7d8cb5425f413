"""Two-way weight conversion between PyTorch (transformers / diffusers layout) and glm_jax checkpoints.

`python -m conversion.from_torch --src DIR --dst DIR` and `python -m conversion.to_torch --src DIR --dst DIR`.
Nothing here imports torch: safetensors files are read and written directly.
"""
