"""The rollout engine at real size on one GPU (random bf16 weights), JAX and PyTorch in the same process.

    python -m benchmarks.rollout_gpu --part ar    # AR sampler: 1024² T2I rollout (1281 tokens), batch 1/8/16/32
    python -m benchmarks.rollout_gpu --part dit   # DiT denoising step (1024², batch 1, guidance 1.5) vs
                                                  # diffusers; a DiT GRPO group rollout (16 images, 10 steps)

AR: `glm_jax.sampling.ar_sampler.sample_ar` (prefill + 1279 decode steps with temperature 0.9 / top-p 0.75 and
grid masking, per-token log-probs) on a left-padded batch of 48-64-token prompts; steps/s = (N - 1) / wall time
of the whole call (prefill included). transformers: `generate(do_sample=True, temperature=0.9, top_p=0.75)` with a
static and a dynamic cache, steps/s = (n2 - n1) / (t(n2) - t(n1)) (prefill cancels; it is too slow for 1281).

DiT: one Euler step with classifier-free guidance 1.5 = two DiT calls (conditional, unconditional with the prior
dropped and the empty-glyph embedding) + the guided update, as `GlmImagePipeline` does each step. The group
rollout: one AR sample (batch 1), 16 Flow-GRPO SDE trajectories of 10 steps (3-step SDE window, guidance 1) and
the VAE decode of the 16 images, each phase timed after blocking.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse
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
    prompts,
    random_module,
    timeit,
    torch_device,
    torch_sync,
    write_result,
)
from benchmarks.real_configs import AR_CONFIG, DIT_CONFIG, VAE_CONFIG
from glm_jax.models.ar import ArConfig, GlmImageAR
from glm_jax.pipeline import ar_token_ids, prior_ids
from glm_jax.sampling import flow
from glm_jax.sampling.ar_sampler import ArLayout, SamplingParams, sample_ar
from glm_jax.sampling.schedule import flow_schedule
from glm_jax.tiny import scheduler_config

DEV = torch_device()
ATTN = "cudnn" if DEV == "cuda" else None
H = W = 256 if SMOKE else 1024
if SMOKE:
    from glm_jax.tiny import tiny_ar_config, tiny_dit_config, tiny_vae_config
    AR_CONFIG = dict(tiny_ar_config(), dtype="bfloat16")
    DIT_CONFIG, VAE_CONFIG = tiny_dit_config(), tiny_vae_config()
SAMPLING = SamplingParams(temperature=0.9, top_k=None, top_p=0.75)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run_ar(res: dict, batches: list[int], with_torch: bool = True) -> None:
    from benchmarks.ar_gpu import build_torch
    tm = build_torch(AR_CONFIG)
    from conversion.tables.ar import RULES
    cfg = ArConfig.from_hf(AR_CONFIG)
    jm = module_from_torch(tm, RULES, lambda: GlmImageAR(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                                                          rngs=nnx.Rngs(0), implementation=ATTN))
    graphdef, state = nnx.split(jm)
    n_codes, eos = ar_token_ids(cfg)
    layout = ArLayout.t2i(H, W)
    rng = np.random.default_rng(0)
    res["ar_layout_tokens"] = layout.n_tokens
    for b in batches:
        p = prompts(cfg, b, layout, rng)
        args = [jnp.asarray(a) for a in p.arrays()]

        def call(b=b, args=args):
            return sample_ar(graphdef, state, *args, jax.random.key(b), SAMPLING, n_codes=n_codes, eos_id=eos,
                             layout=layout).tokens
        t0 = time.time()
        toks = np.asarray(jax_sync(call()))
        compile_s = time.time() - t0
        t = timeit(call, sync=jax_sync, warmup=0, iters=2)
        sps = (layout.n_tokens - 1) / t["median_s"]
        res[f"jax_sample_b{b}"] = {"s_per_rollout": t["median_s"], "steps_per_s": sps, "first_call_s": compile_s,
                                   "prompt_len": int(args[0].shape[1]),
                                   "valid_codes": bool((toks[:, :-1] < n_codes).all() and (toks[:, -1] == eos).all())}
        log(f"jax sample_ar b{b}: {t['median_s']:.2f} s per 1281-token rollout = {sps:.1f} steps/s")
        write_result("rollout_gpu_ar", res)
    state = jm = None
    gc.collect()

    n1, n2 = (4, 12) if SMOKE else (8, 40)
    for impl in ("static", "dynamic") if with_torch else ():
        for b in batches:
            lo = cfg.text.vision_vocab_size
            ids = torch.tensor(rng.integers(lo, lo + min(100_000, (cfg.text.vocab_size - lo) // 2), (b, 64)),
                               device=DEV)
            kw = dict(do_sample=True, temperature=0.9, top_p=0.75, top_k=0, pad_token_id=cfg.image_end_token_id,
                      eos_token_id=None)
            if impl == "static":
                kw["cache_implementation"] = "static"

            def gen(n, ids=ids, kw=kw):
                with torch.no_grad():
                    return tm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                       min_new_tokens=n, **kw)
            try:
                t1 = timeit(lambda: gen(n1), sync=torch_sync, warmup=1, iters=1)["median_s"]
                t2 = timeit(lambda: gen(n2), sync=torch_sync, warmup=0, iters=1)["median_s"]
                res[f"torch_{impl}_sample_b{b}_steps_per_s"] = (n2 - n1) / (t2 - t1)
                log(f"transformers {impl} b{b}: {res[f'torch_{impl}_sample_b{b}_steps_per_s']:.1f} steps/s")
            except Exception as e:  # report, keep the rest
                res[f"torch_{impl}_sample_b{b}_error"] = repr(e)[:300]
            write_result("rollout_gpu_ar", res)


def dit_inputs(rng, cfg_dit: dict, batch: int):
    """Random latents, glyph / empty-glyph embeddings and AR prior ids of one 1024² sample."""
    from glm_jax.models.dit import DiTConfig
    c = DiTConfig.from_hf(cfg_dit)
    t_glyph = 256 if not SMOKE else 8
    lat = rng.standard_normal((batch, H // 8, W // 8, 16)).astype(np.float32)
    glyph = rng.standard_normal((batch, t_glyph, c.text_embed_dim)).astype(np.float32)
    neg = rng.standard_normal((batch, t_glyph, c.text_embed_dim)).astype(np.float32)
    prior = rng.integers(0, 16384 if not SMOKE else 100, (batch, (H // 16) * (W // 16)))
    return c, lat, glyph, neg, prior


def run_dit(res: dict, group: int) -> None:
    from diffusers import GlmImageTransformer2DModel

    from conversion.tables import dit as dit_table
    from glm_jax.models.dit import GlmImageDiT
    from glm_jax.models.vae import AutoencoderKL, VAEConfig
    rng = np.random.default_rng(0)
    c, lat, glyph, neg, prior = dit_inputs(rng, DIT_CONFIG, 1)
    sched = flow_schedule(10, H, W, scheduler_config())
    k = 3
    torch.manual_seed(0)
    with torch.device(DEV):
        tm = GlmImageTransformer2DModel(**{kk: v for kk, v in DIT_CONFIG.items() if not kk.startswith("_")}
                                        ).to(torch.bfloat16).eval()
    tt = lambda a, dt=torch.bfloat16: torch.tensor(np.asarray(a), device=DEV, dtype=dt)
    t_lat = tt(np.transpose(lat, (0, 3, 1, 2)), torch.float32)
    t_glyph, t_neg, t_prior = tt(glyph), tt(neg), tt(prior, torch.long)
    t_step = tt([float(sched.timesteps[k])])
    size, crop = tt([[H, W]]), tt([[0, 0]])
    drop_c = torch.zeros_like(t_prior, dtype=torch.bool)
    dsig = float(sched.sigmas[k + 1] - sched.sigmas[k])

    def torch_step():
        x = t_lat.to(torch.bfloat16)
        vc = tm(hidden_states=x, encoder_hidden_states=t_glyph, prior_token_id=t_prior, prior_token_drop=drop_c,
                timestep=t_step, target_size=size, crop_coords=crop, return_dict=False)[0].float()
        vu = tm(hidden_states=x, encoder_hidden_states=t_neg, prior_token_id=t_prior, prior_token_drop=~drop_c,
                timestep=t_step, target_size=size, crop_coords=crop, return_dict=False)[0].float()
        return t_lat + dsig * (vu + 1.5 * (vc - vu))

    with torch.no_grad():
        ref = torch_step().cpu().numpy()
        res["torch_denoise_step_g1.5"] = timeit(torch_step, sync=torch_sync)
    log(f"diffusers step {res['torch_denoise_step_g1.5']['median_s']:.4f}s")
    jd = module_from_torch(tm, dit_table.RULES, lambda: GlmImageDiT(c, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                                                                    attention=ATTN, rngs=nnx.Rngs(0)))
    tm = None
    gc.collect()
    torch.cuda.empty_cache() if DEV == "cuda" else None
    dg, ds = nnx.split(jd)
    del jd
    cond = flow.make_cond(jnp.asarray(glyph, jnp.bfloat16), jnp.asarray(prior, jnp.int32), H, W,
                          neg_glyph_BTD=jnp.asarray(neg, jnp.bfloat16))

    @jax.jit
    def jstep(ds, x, cond):
        dit = nnx.merge(dg, ds)
        return flow.euler_step(x, flow.velocity(dit, x, k, cond, 1.5, sched), sched, k)

    x0 = jnp.asarray(lat)
    out = np.transpose(np.asarray(jstep(ds, x0, cond)), (0, 3, 1, 2))
    delta_ref, delta = ref - np.transpose(lat, (0, 3, 1, 2)), out - np.transpose(lat, (0, 3, 1, 2))
    res["denoise_step_update_rel_err"] = float(np.abs(delta - delta_ref).max() / np.abs(delta_ref).max())
    res["jax_denoise_step_g1.5"] = timeit(lambda: jstep(ds, x0, cond), sync=jax_sync)
    res["denoise_step_speedup"] = (res["torch_denoise_step_g1.5"]["median_s"]
                                   / res["jax_denoise_step_g1.5"]["median_s"])
    log(f"jax step {res['jax_denoise_step_g1.5']['median_s']:.4f}s, update rel err "
        f"{res['denoise_step_update_rel_err']:.2e}")
    write_result("rollout_gpu_dit", res)

    # -- a DiT GRPO group rollout: 1 AR sample, `group` SDE trajectories, VAE decode --------------------------
    cfg = ArConfig.from_hf(AR_CONFIG)
    jar = random_module(lambda: GlmImageAR(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0),
                                           implementation=ATTN, with_vision=False))
    ag, ast = nnx.split(jar)
    vae = random_module(lambda: AutoencoderKL(VAEConfig.from_hf(VAE_CONFIG), dtype=jnp.bfloat16,
                                              param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    vg, vs = nnx.split(vae)
    n_codes, eos = ar_token_ids(cfg)
    layout = ArLayout.t2i(H, W)
    p = prompts(cfg, 1, layout, rng)
    sde_mask = np.zeros(10, bool)
    sde_mask[2:5] = True

    @jax.jit
    def decode(vs, latents):
        return flow.decode_images(nnx.merge(vg, vs), latents)

    def rollout(seed: int) -> dict:
        times = {}
        t0 = time.perf_counter()
        tokens = sample_ar(ag, ast, *[jnp.asarray(a) for a in p.arrays()], jax.random.key(seed), SAMPLING,
                           n_codes=n_codes, eos_id=eos, layout=layout).tokens
        jax_sync(tokens)
        times["ar_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        pri = jnp.repeat(prior_ids(tokens, layout), group, axis=0)
        gcond = flow.make_cond(jnp.repeat(cond.glyph_BTD, group, 0), pri, H, W)
        ids = jnp.arange(group, dtype=jnp.int32) + 1000 * seed
        x_T = flow.initial_latents(jax.random.key(seed), ids, flow.latent_shape(H, W))
        roll = flow.sde_sample_jit(nnx.merge(dg, ds), x_T, gcond, sched, jax.random.key(seed + 1), ids,
                                   guidance=1.0, noise_level=0.7, sde_mask=sde_mask)
        jax_sync(roll.latents)
        times["dit_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        imgs = jax_sync(decode(vs, roll.latents))
        times["vae_s"] = time.perf_counter() - t0
        times["total_s"] = times["ar_s"] + times["dit_s"] + times["vae_s"]
        times["images"] = int(imgs.shape[0])
        return times

    first = rollout(0)
    res["group_rollout_first_call"] = first
    runs = [rollout(s) for s in (1, 2)]
    med = {kk: float(np.median([r[kk] for r in runs])) for kk in ("ar_s", "dit_s", "vae_s", "total_s")}
    med["images_per_s"] = group / med["total_s"]
    med["group"] = group
    res["group_rollout"] = med
    try:
        res["jax_peak_gib"] = jax.devices()[0].memory_stats().get("peak_bytes_in_use", 0) / 2 ** 30
    except Exception:
        pass
    log(f"group rollout {group}: {med}")
    write_result("rollout_gpu_dit", res)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=("ar", "dit"), required=True)
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--group", type=int, default=16)
    ap.add_argument("--no-torch", action="store_true", help="AR part: skip transformers generate")
    a = ap.parse_args()
    res = {"device": device_info(), "xla_flags": os.environ.get("XLA_FLAGS", "")}
    if a.part == "ar":
        run_ar(res, [int(x) for x in a.batches.split(",")], with_torch=not a.no_torch)
    else:
        run_dit(res, 4 if SMOKE else a.group)


if __name__ == "__main__":
    main()
