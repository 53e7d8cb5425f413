"""Tiny random PyTorch GLM-Image components with the real structure (test-only; imports torch).

Shapes follow the design brief: GQA 2:1, partial rotary 0.5 with 3 M-RoPE sections, VQ latent = ViT width, VAE with
4 blocks x 3 layers and no mid attention, 16 latent channels, gated-gelu T5. Every builder takes a seed so that tests
get different random weights when they want them.
"""

from __future__ import annotations

import torch

N_CODES = 128
AR_VOCAB = 400
T5_D = 32

VAE_MEAN = [-0.2080078125, 1.875, -0.470703125, -1.265625, -1.421875, 0.77734375, -0.3671875, -0.9453125,
            0.318359375, 0.7734375, -0.1884765625, -0.022216796875, -0.220703125, -1.59375, -0.81640625,
            -0.255859375]
VAE_STD = [3.0625, 2.203125, 2.265625, 4.84375, 2.5, 3.9375, 2.203125, 3.03125, 2.1875, 2.046875, 2.71875,
           2.390625, 2.390625, 2.453125, 2.25, 2.15625]


def _randomize(model: torch.nn.Module, seed: int, std: float = 0.05) -> torch.nn.Module:
    """Replaces every parameter by random values so that no zero bias or unit norm hides a bug."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if (name.endswith(("norm.weight", "norm1.weight", "norm2.weight")) or "layernorm" in name
                    or "layer_norm" in name or "norm_out.weight" in name):
                p.copy_(1.0 + std * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g) * (4.0 if p.ndim == 1 else 1.0))
    return model


def ar_config_dict() -> dict:
    return dict(
        text_config=dict(vocab_size=AR_VOCAB, hidden_size=128, intermediate_size=192, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attention_bias=True,
                         vision_vocab_size=N_CODES, pad_token_id=389, eos_token_id=129,
                         max_position_embeddings=1024,
                         rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5,
                                              mrope_section=[2, 3, 3])),
        vision_config=dict(depth=2, hidden_size=64, num_heads=2, intermediate_size=128, image_size=64,
                           patch_size=16),
        vq_config=dict(embed_dim=32, num_embeddings=N_CODES, latent_channels=64),
        image_token_id=386, image_start_token_id=128, image_end_token_id=129)


def tiny_ar(seed: int = 0):
    from transformers import GlmImageConfig, GlmImageForConditionalGeneration
    torch.manual_seed(seed)
    model = GlmImageForConditionalGeneration(GlmImageConfig(**ar_config_dict())).eval()
    _randomize(model, seed)
    model.generation_config.update(do_sample=True, temperature=0.9, top_p=0.75, top_k=N_CODES, eos_token_id=129,
                                   pad_token_id=386)
    return model


def tiny_dit(seed: int = 0, head_dim: int = 16):
    """The tiny DiT (2 layers, 2 heads); `head_dim=128` gives the width (256) the fused GPU ops tile."""
    from diffusers import GlmImageTransformer2DModel
    torch.manual_seed(seed)
    model = GlmImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=16, num_layers=2,
                                       attention_head_dim=head_dim, num_attention_heads=2, text_embed_dim=T5_D,
                                       time_embed_dim=32, condition_dim=16,
                                       prior_vq_quantizer_codebook_size=N_CODES).eval()
    return _randomize(model, seed)


def tiny_vae(seed: int = 0):
    from diffusers import AutoencoderKL
    torch.manual_seed(seed)
    model = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, act_fn="silu",
                          down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                          block_out_channels=(8, 16, 32, 32), layers_per_block=3, norm_num_groups=4,
                          mid_block_add_attention=False, use_quant_conv=False, use_post_quant_conv=False,
                          sample_size=64, scaling_factor=0.18215, shift_factor=None, force_upcast=True,
                          latents_mean=VAE_MEAN, latents_std=VAE_STD).eval()
    return _randomize(model, seed)


def tiny_t5(seed: int = 0):
    from transformers import T5Config, T5EncoderModel
    torch.manual_seed(seed)
    model = T5EncoderModel(T5Config(vocab_size=384, d_model=T5_D, d_kv=8, d_ff=64, num_layers=2,
                                    num_decoder_layers=1, num_heads=4, feed_forward_proj="gated-gelu",
                                    relative_attention_num_buckets=32, relative_attention_max_distance=128,
                                    layer_norm_epsilon=1e-6, dropout_rate=0.0)).eval()
    return _randomize(model, seed)


def tiny_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True,
                                           base_shift=0.25, max_shift=0.75, base_image_seq_len=256,
                                           max_image_seq_len=4096, time_shift_type="linear")


def tiny_processor():
    """transformers `GlmImageProcessor` over the tiny tokenizer, the PIL image processor with the real preprocessor
    values (min/max pixels scaled down to 32²/128²) and the real chat template."""
    from transformers import GlmImageProcessor
    from transformers.models.glm_image.image_processing_pil_glm_image import GlmImageImageProcessorPil
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    from glm_jax.tiny import CHAT_TEMPLATE, tiny_tokenizer
    tok = TokenizersBackend(tokenizer_object=tiny_tokenizer(), bos_token="<|dit_token_16384|>",
                            eos_token="<|dit_token_16385|>", pad_token="<|dit_token_16385|>", padding_side="left",
                            extra_special_tokens={"image_token": "<|image|>", "grid_bos_token": "<sop>",
                                                  "grid_eos_token": "<eop>"})
    images = GlmImageImageProcessorPil(patch_size=16, temporal_patch_size=1, merge_size=1, image_mean=[0.5] * 3,
                                       image_std=[0.5] * 3, min_pixels=32 * 32, max_pixels=128 * 128)
    return GlmImageProcessor(image_processor=images, tokenizer=tok, chat_template=CHAT_TEMPLATE)


def tiny_pipeline(seed: int = 0):
    """A diffusers `GlmImagePipeline` assembled from the tiny components (no hub access)."""
    from diffusers import GlmImagePipeline
    from transformers import ByT5Tokenizer
    return GlmImagePipeline(tokenizer=ByT5Tokenizer(), processor=tiny_processor(), text_encoder=tiny_t5(seed),
                            vision_language_encoder=tiny_ar(seed), vae=tiny_vae(seed), transformer=tiny_dit(seed),
                            scheduler=tiny_scheduler())
