"""Real-size GLM-Image DiT (6.9B) and VAE with random bf16 weights on one GPU: parity and speed against diffusers.

    python -m benchmarks.dit_gpu        # writes $OUT/dit_gpu.json

* diffusers `GlmImageTransformer2DModel` is created on the GPU (bf16, random init) and converted in place to
  `glm_jax.models.dit.GlmImageDiT` through the key table (DLPack, no host copy).
* One forward at 1024² (4096 image tokens, 256 glyph tokens, batch 1): relative error max|Δ|/max|ref| (≤ 2e-2).
* Forward and forward+backward (gradients of all parameters) times, JAX vs diffusers in the same process; the
  PyTorch model is freed before the JAX backward so that each side has the card to itself.
* VAE decode of a 1024² image (bf16) JAX vs diffusers.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import gc
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from benchmarks.common import (
    SMOKE,
    device_info,
    jax_sync,
    module_from_torch,
    timeit,
    torch_device,
    torch_sync,
    write_result,
)
from benchmarks.real_configs import DIT_CONFIG, VAE_CONFIG
from conversion.tables import dit as dit_table
from conversion.tables import vae as vae_table
from glm_jax.models.dit import DiTConfig, GlmImageDiT, dit_flops
from glm_jax.models.vae import AutoencoderKL, VAEConfig

H = W = 64 if SMOKE else 1024
T_GLYPH = 5 if SMOKE else 256
DEV = torch_device()
ATTN = "cudnn" if DEV == "cuda" else None
if SMOKE:
    DIT_CONFIG = dict(DIT_CONFIG, num_layers=2, attention_head_dim=16, num_attention_heads=2, text_embed_dim=32,
                      time_embed_dim=32, condition_dim=16, prior_vq_quantizer_codebook_size=128)
    VAE_CONFIG = dict(VAE_CONFIG, block_out_channels=[8, 16, 32, 32], norm_num_groups=4)


def torch_inputs(rng):
    lat = torch.tensor(rng.standard_normal((1, 16, H // 8, W // 8)), dtype=torch.bfloat16, device=DEV)
    glyph = torch.tensor(rng.standard_normal((1, T_GLYPH, DIT_CONFIG["text_embed_dim"])), dtype=torch.bfloat16, device=DEV)
    n = (H // 16) * (W // 16)
    prior = torch.tensor(rng.integers(0, DIT_CONFIG["prior_vq_quantizer_codebook_size"], (1, n)), device=DEV)
    drop = torch.zeros((1, n), dtype=torch.bool, device=DEV)
    t = torch.tensor([979.0], device=DEV, dtype=torch.bfloat16)
    size = torch.tensor([[H, W]], device=DEV, dtype=torch.bfloat16)
    crop = torch.zeros((1, 2), device=DEV, dtype=torch.bfloat16)
    return lat, glyph, prior, drop, t, size, crop


def main():
    res = {"device": device_info()}
    rng = np.random.default_rng(0)
    from diffusers import AutoencoderKL as TorchVAE
    from diffusers import GlmImageTransformer2DModel

    cfg_kw = {k: v for k, v in DIT_CONFIG.items() if not k.startswith("_")}
    torch.manual_seed(0)
    with torch.device(DEV):
        tm = GlmImageTransformer2DModel(**cfg_kw).to(torch.bfloat16).eval()
    lat, glyph, prior, drop, t, size, crop = torch_inputs(rng)

    def tfwd():
        return tm(hidden_states=lat, encoder_hidden_states=glyph, prior_token_id=prior, prior_token_drop=drop,
                  timestep=t, target_size=size, crop_coords=crop, return_dict=False)[0]

    with torch.no_grad():
        ref = tfwd().float().cpu().numpy()
        res["torch_forward"] = timeit(tfwd, sync=torch_sync)
    cot = torch.randn_like(lat)

    def tfwdbwd():
        tm.zero_grad(set_to_none=True)
        tfwd().backward(cot)
    for p in tm.parameters():
        p.requires_grad_(True)
    if DEV == "cuda":
        torch.cuda.reset_peak_memory_stats()
    res["torch_forward_backward"] = timeit(tfwdbwd, sync=torch_sync, iters=3)
    if DEV == "cuda":
        res["torch_forward_backward_peak_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
    tm.zero_grad(set_to_none=True)
    gc.collect()
    if DEV == "cuda":
        torch.cuda.empty_cache()

    cfg = DiTConfig.from_hf(DIT_CONFIG)
    t0 = time.time()
    jm = module_from_torch(tm, dit_table.RULES, lambda: GlmImageDiT(cfg, dtype=jnp.bfloat16,
                                                                    param_dtype=jnp.bfloat16,
                                                                    attention=ATTN, rngs=nnx.Rngs(0)))
    res["convert_s"] = time.time() - t0
    graphdef, state = nnx.split(jm)
    del jm
    to_j = lambda x: jax.dlpack.from_dlpack(x.contiguous())
    j_lat = jnp.transpose(to_j(lat), (0, 2, 3, 1))
    j_args = (to_j(glyph), to_j(prior).astype(jnp.int32), to_j(drop), to_j(t).astype(jnp.float32),
              to_j(size).astype(jnp.float32), to_j(crop).astype(jnp.float32))
    j_cot = jnp.transpose(to_j(cot), (0, 2, 3, 1))
    tm = None  # free the PyTorch model before the JAX backward
    gc.collect()
    if DEV == "cuda":
        torch.cuda.empty_cache()

    @jax.jit
    def jfwd(state, lat, args):
        return nnx.merge(graphdef, state)(lat, *args)[0]

    out = np.asarray(jnp.transpose(jfwd(state, j_lat, j_args), (0, 3, 1, 2)).astype(jnp.float32))
    res["forward_rel_err"] = float(np.abs(out - ref).max() / np.abs(ref).max())
    res["jax_forward"] = timeit(lambda: jfwd(state, j_lat, j_args), sync=jax_sync)

    @jax.jit
    def jgrad(state, lat, args, cot):
        def f(s):
            return jnp.vdot(nnx.merge(graphdef, s)(lat, *args)[0].astype(jnp.float32), cot.astype(jnp.float32))
        return jax.grad(f)(state)

    t0 = time.time()
    jax_sync(jgrad(state, j_lat, j_args, j_cot))
    res["jax_forward_backward_compile_s"] = time.time() - t0
    res["jax_forward_backward"] = timeit(lambda: jgrad(state, j_lat, j_args, j_cot), sync=jax_sync, iters=3)
    try:
        stats = jax.devices()[0].memory_stats()
        res["jax_peak_gib"] = stats.get("peak_bytes_in_use", 0) / 2 ** 30
    except Exception:
        pass
    flops = dit_flops(cfg, (H // 16) * (W // 16), T_GLYPH, 0)
    res["dit_forward_tflop"] = flops / 1e12
    for k in ("jax_forward", "torch_forward"):
        res[k]["tflops_per_s"] = flops / res[k]["median_s"] / 1e12
    for k in ("jax_forward_backward", "torch_forward_backward"):
        res[k]["tflops_per_s"] = 3 * flops / res[k]["median_s"] / 1e12
    res["speedup_forward"] = res["torch_forward"]["median_s"] / res["jax_forward"]["median_s"]
    res["speedup_forward_backward"] = (res["torch_forward_backward"]["median_s"]
                                       / res["jax_forward_backward"]["median_s"])
    state = None
    gc.collect()

    # -- VAE decode at 1024² ---------------------------------------------------------------------------------
    vae_kw = {k: v for k, v in VAE_CONFIG.items() if not k.startswith("_")}
    with torch.device(DEV):
        tv = TorchVAE(**vae_kw).to(torch.bfloat16).eval()
    z = torch.tensor(rng.standard_normal((1, 16, H // 8, W // 8)), dtype=torch.bfloat16, device=DEV)
    with torch.no_grad():
        vref = tv.decode(z).sample.float().cpu().numpy()
        res["torch_vae_decode"] = timeit(lambda: tv.decode(z).sample, sync=torch_sync)
    vcfg = VAEConfig.from_hf(VAE_CONFIG)
    jv = module_from_torch(tv, vae_table.RULES, lambda: AutoencoderKL(vcfg, dtype=jnp.bfloat16,
                                                                      param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    vg, vs = nnx.split(jv)
    jz = jnp.transpose(to_j(z), (0, 2, 3, 1))

    @jax.jit
    def jdec(vs, z):
        return nnx.merge(vg, vs).decode(z)

    vout = np.asarray(jnp.transpose(jdec(vs, jz), (0, 3, 1, 2)).astype(jnp.float32))
    res["vae_decode_rel_err"] = float(np.abs(vout - vref).max() / np.abs(vref).max())
    res["jax_vae_decode"] = timeit(lambda: jdec(vs, jz), sync=jax_sync)
    write_result("dit_gpu", res)


if __name__ == "__main__":
    main()
