"""Real GLM-Image component configs (the values of the published `config.json` files, see the architecture brief
§0), for benchmarks with random weights at real size."""

AR_CONFIG = {
    "model_type": "glm_image", "architectures": ["GlmImageForConditionalGeneration"],
    "text_config": {
        "model_type": "glm_image_text", "vocab_size": 168064, "hidden_size": 4096, "intermediate_size": 13696,
        "num_hidden_layers": 40, "num_attention_heads": 32, "num_key_value_heads": 2, "attention_bias": True,
        "hidden_act": "silu", "rms_norm_eps": 1e-5, "max_position_embeddings": 131072,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                            "mrope_section": [8, 12, 12]},
        "vision_vocab_size": 16512, "pad_token_id": 167841, "eos_token_id": 16385},
    "vision_config": {"model_type": "glm_image_vision", "depth": 40, "hidden_size": 1536, "num_heads": 16,
                      "intermediate_size": 6144, "hidden_act": "gelu", "attention_bias": True, "image_size": 2048,
                      "patch_size": 16, "in_channels": 3, "layer_norm_eps": 1e-6, "spatial_merge_size": 1},
    "vq_config": {"model_type": "glm_image_vqmodel", "embed_dim": 2048, "num_embeddings": 16384,
                  "latent_channels": 1536, "in_channels": 3},
    "image_token_id": 167855, "image_start_token_id": 16384, "image_end_token_id": 16385,
    "tie_word_embeddings": False, "dtype": "bfloat16",
}

DIT_CONFIG = {
    "_class_name": "GlmImageTransformer2DModel", "patch_size": 2, "in_channels": 16, "out_channels": 16,
    "num_layers": 30, "attention_head_dim": 128, "num_attention_heads": 32, "text_embed_dim": 1472,
    "time_embed_dim": 512, "condition_dim": 256, "prior_vq_quantizer_codebook_size": 16384,
}

VAE_CONFIG = {
    "_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "latent_channels": 16,
    "block_out_channels": [128, 512, 1024, 1024], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4, "layers_per_block": 3, "norm_num_groups": 32, "act_fn": "silu",
    "mid_block_add_attention": False, "use_quant_conv": False, "use_post_quant_conv": False,
    "force_upcast": True, "sample_size": 1024, "scaling_factor": 0.18215, "shift_factor": None,
    "latents_mean": [-0.2080078125, 1.875, -0.470703125, -1.265625, -1.421875, 0.77734375, -0.3671875, -0.9453125,
                     0.318359375, 0.7734375, -0.1884765625, -0.022216796875, -0.220703125, -1.59375, -0.81640625,
                     -0.255859375],
    "latents_std": [3.0625, 2.203125, 2.265625, 4.84375, 2.5, 3.9375, 2.203125, 3.03125, 2.1875, 2.046875, 2.71875,
                    2.390625, 2.390625, 2.453125, 2.25, 2.15625],
}
