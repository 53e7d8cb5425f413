"""Flax NNX modules of GLM-Image: the AR model (text decoder, ViT, VQ), the DiT, the VAE and the T5 glyph encoder."""
