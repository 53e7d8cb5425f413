"""The embedded default: a tiny random GLM-Image with the real structure, and its hub-free tokenizer.

The real AR tokenizer (GLM-4 BPE, `processor/tokenizer.json`) cannot be rebuilt offline, so the tiny model uses a
byte-level tokenizer with the same special-token roles. Token ids of the tiny AR (vocab 400, 128 image codes):

    0..127     image codes `<|dit_token_{i}|>` (= VQ codebook index = DiT prior id)
    128        `<|dit_token_16384|>`  image start / generation BOS
    129        `<|dit_token_16385|>`  image end / EOS / pad
    130..385   the 256 bytes (GPT-2 byte-to-unicode alphabet, no merges)
    386 `<|image|>`, 387 `<sop>`, 388 `<eop>`, 389 `<|endoftext|>`

The configs below mirror the real `config.json` files at a small size (GQA 2:1, partial rotary 0.5 with three
M-RoPE sections, VQ latent = ViT width, VAE with 4 blocks x 3 layers, gated-gelu T5).
"""

from __future__ import annotations

N_CODES = 128
BOS_ID, EOS_ID = 128, 129
BYTE_OFFSET = 130
IMAGE_TOKEN_ID, SOP_ID, EOP_ID, PAD_ID = 386, 387, 388, 389
AR_VOCAB = 400

SPECIAL_TOKENS = {
    "<|dit_token_16384|>": BOS_ID, "<|dit_token_16385|>": EOS_ID, "<|image|>": IMAGE_TOKEN_ID,
    "<sop>": SOP_ID, "<eop>": EOP_ID, "<|endoftext|>": PAD_ID,
}


def _bytes_to_unicode() -> dict[int, str]:
    """The reversible byte -> printable character map of byte-level BPE tokenizers."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars = list(printable)
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


def tiny_tokenizer():
    """A `tokenizers.Tokenizer` with the tiny id layout above (byte-level, special tokens kept whole)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    vocab = {f"<|dit_token_{i}|>": i for i in range(N_CODES)}
    vocab.update(SPECIAL_TOKENS)
    for b, ch in _bytes_to_unicode().items():
        vocab[ch] = BYTE_OFFSET + b
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok


def tiny_ar_config() -> dict:
    """HF `GlmImageConfig` dict of the tiny AR."""
    return {
        "model_type": "glm_image", "architectures": ["GlmImageForConditionalGeneration"],
        "text_config": {
            "model_type": "glm_image_text", "vocab_size": AR_VOCAB, "hidden_size": 128, "intermediate_size": 192,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "attention_bias": True,
            "vision_vocab_size": N_CODES, "pad_token_id": PAD_ID, "eos_token_id": EOS_ID,
            "max_position_embeddings": 1024, "rms_norm_eps": 1e-5, "hidden_act": "silu",
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                                "mrope_section": [2, 3, 3]}},
        "vision_config": {"model_type": "glm_image_vision", "depth": 2, "hidden_size": 64, "num_heads": 2,
                          "intermediate_size": 128, "image_size": 64, "patch_size": 16, "in_channels": 3,
                          "layer_norm_eps": 1e-6, "attention_bias": True, "hidden_act": "gelu",
                          "spatial_merge_size": 1},
        "vq_config": {"model_type": "glm_image_vqmodel", "embed_dim": 32, "num_embeddings": N_CODES,
                      "latent_channels": 64, "in_channels": 3},
        "image_token_id": IMAGE_TOKEN_ID, "image_start_token_id": BOS_ID, "image_end_token_id": EOS_ID,
        "tie_word_embeddings": False,
    }
