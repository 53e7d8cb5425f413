"""VAE parity vs diffusers `AutoencoderKL` (tiny fp32 model, non-square batch of 2), the pipeline's latent
normalisation and uint8 postprocessing, the key table (tiny round trip and real-size shapes), config errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from conversion.apply import load_state_dict_into, param_shapes, torch_state_dict
from conversion.table import find_torch, torch_shape_to_jax
from conversion.tables.vae import RULES
from glm_jax.models.vae import AutoencoderKL, VAEConfig, to_uint8
from tests.tiny_torch import VAE_MEAN, VAE_STD, tiny_vae
from tests.util import rel_err, torch_to_numpy_state

# The real `vae/config.json` of zai-org/GLM-Image (brief §0).
REAL_CONFIG = {
    "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 512, 1024, 1024],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "force_upcast": True, "in_channels": 3, "out_channels": 3, "latent_channels": 16, "layers_per_block": 3,
    "norm_num_groups": 32, "mid_block_add_attention": False, "use_quant_conv": False,
    "use_post_quant_conv": False, "sample_size": 1024, "scaling_factor": 0.18215, "shift_factor": None,
    "latents_mean": VAE_MEAN, "latents_std": VAE_STD,
}


def nchw(x_BHWC) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x_BHWC).transpose(0, 3, 1, 2))


def nhwc(x_BCHW) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x_BCHW).transpose(0, 2, 3, 1))


@pytest.fixture(scope="module")
def models():
    torch_model = tiny_vae(seed=5)
    cfg = VAEConfig.from_hf(dict(torch_model.config))
    module = AutoencoderKL(cfg, rngs=nnx.Rngs(0))
    load_state_dict_into(module, torch_to_numpy_state(torch_model), RULES)
    return torch_model, module


_encode = nnx.jit(lambda m, x: m.encode_mean(x))
_decode = nnx.jit(lambda m, z: m.decode(z))


@pytest.mark.parametrize("shape", [(2, 48, 80), (1, 44, 38)])   # 44x38: odd sizes after the first downsample
def test_encode_mean_matches_posterior_mode(models, shape):
    torch_model, module = models
    b, h, w = shape
    x_BCHW = np.random.RandomState(h).uniform(-1, 1, (b, 3, h, w)).astype(np.float32)
    with torch.no_grad():
        ref = torch_model.encode(torch.from_numpy(x_BCHW)).latent_dist.mode().numpy()
    got = _encode(module, jnp.asarray(nhwc(x_BCHW)))
    assert got.shape == nhwc(ref).shape
    err = rel_err(nchw(got), ref)
    assert err < 1e-5, err


def test_decode_matches(models):
    torch_model, module = models
    z_BCHW = (2.0 * np.random.RandomState(7).randn(2, 16, 6, 10)).astype(np.float32)
    with torch.no_grad():
        ref = torch_model.decode(torch.from_numpy(z_BCHW)).sample.numpy()
    got = _decode(module, jnp.asarray(nhwc(z_BCHW)))
    assert got.shape == (2, 48, 80, 3)
    err = rel_err(nchw(got), ref)
    assert err < 1e-5, err


def test_bf16_compute_is_close(models):
    """bf16 activations with fp32 GroupNorm statistics stay near the fp32 torch decoder."""
    torch_model, module = models
    cfg = module.cfg
    low = AutoencoderKL(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    load_state_dict_into(low, torch_to_numpy_state(torch_model), RULES)
    z_BCHW = np.random.RandomState(8).randn(1, 16, 5, 7).astype(np.float32)
    with torch.no_grad():
        ref = torch_model.decode(torch.from_numpy(z_BCHW)).sample.numpy()
    got = _decode(low, jnp.asarray(nhwc(z_BCHW)))
    assert got.dtype == jnp.bfloat16
    assert rel_err(nchw(got.astype(jnp.float32)), ref) < 5e-2


def test_normalize_denormalize_match_pipeline(models):
    """(z - mean) / std before the DiT (pipeline i2i) and z * std + mean before decoding, per channel.

    Equal to torch up to float rounding only: XLA turns a division by a broadcast vector into a multiply by its
    reciprocal and contracts `z * std + mean` into an FMA, so a couple of ulps are allowed.
    """
    _, module = models
    z_BCHW = (3.0 * np.random.RandomState(9).randn(2, 16, 5, 7)).astype(np.float32)
    mean = torch.tensor(VAE_MEAN).view(1, 16, 1, 1)
    std = torch.tensor(VAE_STD).view(1, 16, 1, 1)
    z = torch.from_numpy(z_BCHW)
    want_norm = ((z - mean) / std).numpy()
    want_denorm = (z * std + mean).numpy()
    got_norm = nchw(jax.jit(module.normalize)(jnp.asarray(nhwc(z_BCHW))))
    got_denorm = nchw(jax.jit(module.denormalize)(jnp.asarray(nhwc(z_BCHW))))
    assert np.all(np.abs(got_norm - want_norm) <= 2 * np.spacing(np.abs(want_norm)))
    scale = (z.abs() * std + mean.abs()).numpy()
    assert np.all(np.abs(got_denorm - want_denorm) <= 2 * np.spacing(scale))
    # a per-channel mix-up (wrong axis or order) would be far outside these bounds
    assert np.abs(got_norm - want_norm).max() < 1e-6 and np.abs(got_denorm - want_denorm).max() < 1e-5
    back = nchw(module.denormalize(module.normalize(jnp.asarray(nhwc(z_BCHW)))))
    np.testing.assert_allclose(back, z_BCHW, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_to_uint8_matches_postprocess(dtype):
    from diffusers.image_processor import VaeImageProcessor
    rng = np.random.RandomState(11)
    x = rng.uniform(-1.4, 1.4, (2, 3, 9, 13)).astype(np.float32)
    # exact ties of (x/2+0.5)*255 (x = 0 -> 127.5), the clip edges and values just inside them
    x[0, 0, 0, :6] = [0.0, -1.0, 1.0, 1.0 - 1e-7, -1.0 + 1e-7, 2.5]
    # near-ties: x = (2k + 1) / 255 - 1 gives (x/2+0.5)*255 close to k + 0.5
    x[1].reshape(-1)[:255] = (2 * np.arange(255, dtype=np.float32) + 1) / 255 - 1
    x_t = torch.from_numpy(x).to(dtype)
    pil = VaeImageProcessor(vae_scale_factor=8).postprocess(x_t, output_type="pil")
    want = np.stack([np.asarray(im) for im in pil])
    got = np.asarray(jax.jit(to_uint8)(jnp.asarray(nhwc(x_t.float().numpy())).astype(
        jnp.bfloat16 if dtype == torch.bfloat16 else jnp.float32)))
    assert got.dtype == np.uint8 and got.shape == want.shape
    np.testing.assert_array_equal(got, want)


def test_key_table_round_trip_is_bit_exact(models):
    torch_model, module = models
    want = torch_to_numpy_state(torch_model)
    got = torch_state_dict(module, RULES)
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].shape == want[k].shape, k
        assert got[k].tobytes() == want[k].tobytes(), k


def test_key_table_covers_real_size_vae():
    """Every tensor of the real-size diffusers VAE maps to a parameter of the same (transformed) shape."""
    from diffusers import AutoencoderKL as TorchAutoencoderKL
    init = {k: v for k, v in REAL_CONFIG.items() if not k.startswith("_")}
    with torch.device("meta"):
        torch_model = TorchAutoencoderKL(**init)
    torch_shapes = {k: tuple(v.shape) for k, v in torch_model.state_dict().items()}
    assert len(torch_shapes) == 288
    abstract = nnx.eval_shape(lambda: AutoencoderKL(VAEConfig.from_hf(REAL_CONFIG), rngs=nnx.Rngs(0)))
    expected = param_shapes(abstract)
    mapped = {}
    for key, shape in torch_shapes.items():
        hit = find_torch(RULES, key)
        assert hit is not None, key
        path, rule = hit
        mapped[path] = torch_shape_to_jax(shape, rule.transform)
    assert mapped == {p: tuple(s.shape) for p, s in expected.items()}
    assert sum(int(np.prod(s)) for s in mapped.values()) == sum(int(np.prod(s)) for s in torch_shapes.values())


@pytest.mark.parametrize("override, match", [
    ({"mid_block_add_attention": True}, "mid_block_add_attention"),
    ({"mid_block_add_attention": None}, None),
    ({"use_quant_conv": True}, "use_quant_conv"),
    ({"use_post_quant_conv": True}, "use_post_quant_conv"),
    ({"act_fn": "gelu"}, "act_fn"),
    ({"down_block_types": ["DownEncoderBlock2D"] * 3 + ["AttnDownEncoderBlock2D"]}, "down_block_types"),
    ({"latents_std": VAE_STD[:8]}, "latents_std"),
    ({"norm_num_groups": 48}, "norm_num_groups"),
])
def test_unsupported_config_is_a_clear_error(override, match):
    cfg = dict(REAL_CONFIG, **override)
    if match is None:   # a key absent from config.json takes diffusers' default (True for the attention flag)
        del cfg["mid_block_add_attention"]
        match = "mid_block_add_attention"
    with pytest.raises(ValueError, match=match):
        VAEConfig.from_hf(cfg)


def test_missing_quant_conv_flags_default_to_unsupported():
    cfg = {k: v for k, v in REAL_CONFIG.items() if k != "use_quant_conv"}
    with pytest.raises(ValueError, match="use_quant_conv"):
        VAEConfig.from_hf(cfg)


def test_real_config_sizes():
    cfg = VAEConfig.from_hf(REAL_CONFIG)
    assert cfg.block_out_channels == (128, 512, 1024, 1024) and cfg.latent_channels == 16
    assert cfg.layers_per_block == 3 and cfg.norm_num_groups == 32
    assert cfg.latents_mean == tuple(VAE_MEAN) and cfg.latents_std == tuple(VAE_STD)
