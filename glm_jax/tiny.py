"""The embedded default: a tiny random GLM-Image with the real structure, and its hub-free tokenizer.

The real AR tokenizer (GLM-4 BPE, `processor/tokenizer.json`) cannot be rebuilt offline, so the tiny model uses a
byte-level tokenizer with the same special-token roles. Token ids of the tiny AR (vocab 400, 128 image codes):

    0..127     image codes `<|dit_token_{i}|>` (= VQ codebook index = DiT prior id)
    128        `<|dit_token_16384|>`  image start / generation BOS
    129        `<|dit_token_16385|>`  image end / EOS / pad
    130..385   the 256 bytes (GPT-2 byte-to-unicode alphabet, no merges)
    386 `<|image|>`, 387 `<sop>`, 388 `<eop>`, 389 `<|endoftext|>`

The tiny `lm_head` has `N_CODES + 2` rows, like the real head that covers the codes and the image start/end
ids (16512 > 16385). The configs below mirror the real `config.json` files at a small size (GQA 2:1, partial rotary 0.5 with three
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
            "vision_vocab_size": N_CODES + 2, "pad_token_id": PAD_ID, "eos_token_id": EOS_ID,
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


def tiny_dit_config() -> dict:
    """diffusers `transformer/config.json` of the tiny DiT (codebook = the tiny AR's image codes)."""
    return {"_class_name": "GlmImageTransformer2DModel", "patch_size": 2, "in_channels": 16, "out_channels": 16,
            "num_layers": 2, "attention_head_dim": 16, "num_attention_heads": 2, "text_embed_dim": 32,
            "time_embed_dim": 32, "condition_dim": 16, "prior_vq_quantizer_codebook_size": N_CODES}


def tiny_vae_config() -> dict:
    """diffusers `vae/config.json` of the tiny VAE (the real latent mean/std, 16 channels, x8)."""
    from glm_jax.models.vae import VAEConfig  # noqa: F401  (checks the module exists)
    return {"_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "latent_channels": 16,
            "act_fn": "silu", "down_block_types": ["DownEncoderBlock2D"] * 4,
            "up_block_types": ["UpDecoderBlock2D"] * 4, "block_out_channels": [8, 16, 32, 32],
            "layers_per_block": 3, "norm_num_groups": 4, "mid_block_add_attention": False,
            "use_quant_conv": False, "use_post_quant_conv": False, "sample_size": 64, "scaling_factor": 0.18215,
            "shift_factor": None, "force_upcast": True,
            "latents_mean": [-0.2080078125, 1.875, -0.470703125, -1.265625, -1.421875, 0.77734375, -0.3671875,
                             -0.9453125, 0.318359375, 0.7734375, -0.1884765625, -0.022216796875, -0.220703125,
                             -1.59375, -0.81640625, -0.255859375],
            "latents_std": [3.0625, 2.203125, 2.265625, 4.84375, 2.5, 3.9375, 2.203125, 3.03125, 2.1875, 2.046875,
                            2.71875, 2.390625, 2.390625, 2.453125, 2.25, 2.15625]}


def tiny_t5_config() -> dict:
    """transformers `text_encoder/config.json` of the tiny ByT5-style glyph encoder (d_model = DiT text dim)."""
    return {"model_type": "t5", "architectures": ["T5EncoderModel"], "vocab_size": 384, "d_model": 32, "d_kv": 8,
            "d_ff": 64, "num_layers": 2, "num_decoder_layers": 1, "num_heads": 4,
            "feed_forward_proj": "gated-gelu", "relative_attention_num_buckets": 32,
            "relative_attention_max_distance": 128, "layer_norm_epsilon": 1e-6, "dropout_rate": 0.0,
            "is_encoder_decoder": True, "pad_token_id": 0, "eos_token_id": 1}


def scheduler_config() -> dict:
    """The GLM-Image `scheduler/scheduler_config.json` (same for the tiny and the real model)."""
    return {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 1.0,
            "use_dynamic_shifting": True, "base_shift": 0.25, "max_shift": 0.75, "base_image_seq_len": 256,
            "max_image_seq_len": 4096, "time_shift_type": "linear", "invert_sigmas": False,
            "shift_terminal": None, "stochastic_sampling": False, "use_karras_sigmas": False,
            "use_exponential_sigmas": False, "use_beta_sigmas": False}


TINY_CONFIGS = {"vision_language_encoder": tiny_ar_config, "transformer": tiny_dit_config,
                "vae": tiny_vae_config, "text_encoder": tiny_t5_config}


def random_params(slot: str, hf_config: dict, seed: int) -> dict:
    """Flat `{path: np.ndarray}` parameters of a freshly initialised module (fixed seed => same weights)."""
    import jax
    import numpy as np
    from flax import nnx

    from glm_jax.components import COMPONENTS
    spec = COMPONENTS[slot]
    cfg = spec.config_from_hf(hf_config)
    with jax.default_device(jax.devices(draw_backend())[0]):
        model = spec.model_class()(cfg, rngs=nnx.Rngs(seed))
    return {".".join(str(p) for p in path): np.asarray(var.get_value())
            for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def draw_backend() -> str:
    """Where the embedded checkpoint's weights are drawn: on the CPU whenever JAX has one (so that a GPU host draws
    what a CPU host does, and so does the CPU subprocess that writes it for a multi-process run), else on the
    default backend."""
    import jax
    try:
        jax.devices("cpu")
        return "cpu"
    except RuntimeError:
        return jax.default_backend()


def write_tiny_checkpoint(dst: str, seed: int = 0) -> str:
    """Writes the embedded default, a complete glm_jax checkpoint of a tiny random GLM-Image, to `dst`.

    Every component is initialised from `seed` (deterministic), and the processor folder holds the tiny
    tokenizer, the real chat template and the real preprocessor values (min/max pixels scaled down)."""
    import json
    import os
    import shutil

    from glm_jax.checkpoint import FORMAT_VERSION, MANIFEST, publish_dir, save_params
    tmp = f"{dst}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    manifest = {"format_version": FORMAT_VERSION, "source_layout": "pipeline", "components": {}, "tiny": True,
                "seed": seed}
    classes = {"vision_language_encoder": "GlmImageForConditionalGeneration",
               "transformer": "GlmImageTransformer2DModel", "vae": "AutoencoderKL", "text_encoder": "T5EncoderModel"}
    for k, (slot, make) in enumerate(TINY_CONFIGS.items()):
        cfg = make()
        os.makedirs(os.path.join(tmp, slot))
        with open(os.path.join(tmp, slot, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
        save_params(os.path.join(tmp, slot, "params"), random_params(slot, cfg, seed * 100 + k))
        manifest["components"][slot] = {"class": classes[slot]}
    write_tiny_processor(os.path.join(tmp, "processor"))
    os.makedirs(os.path.join(tmp, "scheduler"))
    with open(os.path.join(tmp, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(scheduler_config(), f, indent=2)
    os.makedirs(os.path.join(tmp, "tokenizer"))
    with open(os.path.join(tmp, "tokenizer", "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "ByT5Tokenizer", "extra_ids": 0}, f, indent=2)
    with open(os.path.join(tmp, "model_index.json"), "w") as f:
        json.dump({"_class_name": "GlmImagePipeline", "_diffusers_version": "0.42.1",
                   "processor": ["transformers", "GlmImageProcessor"],
                   "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
                   "text_encoder": ["transformers", "T5EncoderModel"],
                   "tokenizer": ["transformers", "ByT5Tokenizer"],
                   "transformer": ["diffusers", "GlmImageTransformer2DModel"],
                   "vae": ["diffusers", "AutoencoderKL"],
                   "vision_language_encoder": ["transformers", "GlmImageForConditionalGeneration"]}, f, indent=2)
    with open(os.path.join(tmp, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=2)
    publish_dir(tmp, dst)
    return dst


CHAT_TEMPLATE = ("{%- for m in messages -%}\n{%- if m.content is string -%}\n{{ m.content }}\n{%- else -%}\n"
                 "{%- for item in m.content -%}\n{%- if item.type == 'image' or item.get('image') is not none -%}\n"
                 "<|dit_token_16384|><|image|><|dit_token_16385|>\n{%- elif item.type == 'text' -%}\n{{ item.text }}\n"
                 "{%- endif -%}\n{%- endfor -%}\n{%- endif -%}\n{%- endfor -%}")


def write_tiny_processor(directory: str) -> None:
    """The `processor/` folder of the tiny model, in the layout of the real checkpoint's processor folder."""
    import json
    import os
    os.makedirs(directory, exist_ok=True)
    tiny_tokenizer().save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "TokenizersBackend", "bos_token": "<|dit_token_16384|>",
                   "eos_token": "<|dit_token_16385|>", "pad_token": "<|dit_token_16385|>", "padding_side": "left",
                   "image_token": "<|image|>", "grid_bos_token": "<sop>", "grid_eos_token": "<eop>",
                   "model_max_length": 4096,
                   "extra_special_tokens": {"image_token": "<|image|>", "grid_bos_token": "<sop>",
                                            "grid_eos_token": "<eop>"}}, f, indent=2)
    with open(os.path.join(directory, "chat_template.jinja"), "w") as f:
        f.write(CHAT_TEMPLATE)
    with open(os.path.join(directory, "preprocessor_config.json"), "w") as f:
        json.dump({"image_processor_type": "GlmImageImageProcessor", "processor_class": "GlmImageProcessor",
                   "do_resize": True, "do_rescale": True, "do_normalize": True, "do_convert_rgb": True,
                   "rescale_factor": 1 / 255, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
                   "resample": 3, "patch_size": 16, "temporal_patch_size": 1, "merge_size": 1,
                   "min_pixels": 32 * 32, "max_pixels": 128 * 128,
                   "size": {"shortest_edge": 32 * 32, "longest_edge": 128 * 128}}, f, indent=2)


def builder_files() -> list[str]:
    """The source files whose code decides the embedded checkpoint's contents: this module, the checkpoint
    format and component registry, and the models (their parameter initialisers)."""
    import glob
    import os
    pkg = os.path.dirname(os.path.abspath(__file__))
    return [os.path.join(pkg, f) for f in ("tiny.py", "checkpoint.py", "components.py")] + \
        sorted(glob.glob(os.path.join(pkg, "models", "*.py")))


def numerics_tag(xla_flags: str | None = None, backend: str | None = None) -> str:
    """What, besides the code, decides the random weights' last bits: the backend that draws them (`draw_backend`)
    and XLA's optimisation level (`--xla_backend_optimization_level` in `XLA_FLAGS`; the tests run XLA's CPU
    backend at level 0). The same seed drawn at level 0 and at the default level differs in the last bit of some
    weights, enough for a 200-step run to take another course, so the two get separate cache entries."""
    import os
    import re
    flags = os.environ.get("XLA_FLAGS", "") if xla_flags is None else xla_flags
    level = re.findall(r"--xla_backend_optimization_level=(\d+)", flags)
    return f"{backend or draw_backend()} opt {level[-1] if level else 'default'}"


def tiny_cache_key(seed: int, files: list[str] | None = None, xla_flags: str | None = None,
                   backend: str | None = None) -> str:
    """The embedded checkpoint's cache key: a hash of the tiny configs, the seed, the JAX and Flax versions, the
    builder's source (`builder_files`) and the numerics it runs under (`numerics_tag`), so that a checkpoint
    written by another version, or drawn under other numerics, is never reused."""
    import hashlib
    import json

    import flax
    import jax
    h = hashlib.sha256(json.dumps({k: f() for k, f in TINY_CONFIGS.items()} | {"seed": seed, "v": 2},
                                  sort_keys=True).encode())
    h.update(f"jax {jax.__version__} flax {flax.__version__} {numerics_tag(xla_flags, backend)}".encode())
    for path in builder_files() if files is None else files:
        with open(path, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:12]


def tiny_checkpoint(cache_dir: str | None = None, seed: int = 0, backend: str | None = None) -> str:
    """The embedded default checkpoint, written once to a cache folder keyed by `tiny_cache_key` (the tiny
    configs, the seed, the code that builds it and the numerics that draw it) in `$GLM_JAX_CACHE` (default
    `~/.cache/glm_jax`), and reused afterwards. `backend`: the backend whose draw to look up (default
    `draw_backend()`; the processes of a multi-process run look up what a CPU subprocess wrote)."""
    import os
    digest = tiny_cache_key(seed, backend=backend)
    root = cache_dir or os.environ.get("GLM_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                                          "glm_jax")
    path = os.path.join(root, f"tiny-{digest}")
    if not os.path.exists(os.path.join(path, "glm_jax.json")):
        os.makedirs(root, exist_ok=True)
        write_tiny_checkpoint(path, seed=seed)
    return path
