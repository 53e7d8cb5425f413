"""The trainer's rollouts at real size on one GPU with float32 trained weights (`model.param_dtype=float32`, the
default) and bfloat16 compute, three ways, in one process:

    python -m benchmarks.rollout_dtype_gpu --part ar    # AR sampling: B rows of a 1024² T2I rollout (1281 tokens)
    python -m benchmarks.rollout_dtype_gpu --part dit   # DiT: G SDE trajectories of 10 steps (3-step window)

* `bf16`: the weights stored in bfloat16 (what a `model.param_dtype=bfloat16` run samples from);
* `fp32`: float32 weights, the rollout sampling from its bfloat16 copy (`layers.cast_for_compute`, made once in
  the rollout's jitted function);
* `fp32_direct`: float32 weights sampled from directly (each layer casting its weights at every step), as the
  rollouts did before that copy.

The functions timed are the trainer's (`grpo.rollout.sample_group_tokens`, `grpo.rollout.dit_group_rollout`, with
its SDE phase timed on its own), on random weights. The first call of each variant compiles and is reported
apart; then `--iters` calls are timed. Peak memory: the allocator's peak after each variant (it only grows).
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
from flax import nnx

from benchmarks.common import SMOKE, device_info, jax_sync, prompts, random_module, write_result
from benchmarks.real_configs import AR_CONFIG, DIT_CONFIG, VAE_CONFIG
from glm_jax.grpo import rollout as R
from glm_jax.grpo.optim import cast_floating
from glm_jax.models.ar import ArConfig, GlmImageAR
from glm_jax.pipeline import ar_token_ids
from glm_jax.sampling.ar_sampler import ArLayout, SamplingParams
from glm_jax.sampling.schedule import flow_schedule
from glm_jax.tiny import scheduler_config

ATTN = "cudnn" if jax.default_backend() == "gpu" else None
H = W = 256 if SMOKE else 1024
if SMOKE:
    from glm_jax.tiny import tiny_ar_config, tiny_dit_config, tiny_vae_config
    AR_CONFIG, DIT_CONFIG, VAE_CONFIG = tiny_ar_config(), tiny_dit_config(), tiny_vae_config()
SAMPLING = SamplingParams(temperature=0.9, top_k=None, top_p=0.75)
VARIANTS = ("fp32", "fp32_direct", "bf16")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def peak_gib() -> float | None:
    try:
        return jax.devices()[0].memory_stats().get("peak_bytes_in_use", 0) / 2 ** 30
    except Exception:   # backends without memory stats
        return None


def run(res: dict, part: str, call, state32, iters: int) -> None:
    """Times `call(state)` for every variant (compile call first, then `iters` calls)."""
    original = R.cast_for_compute
    try:
        for name in VARIANTS:
            state = cast_floating(state32, jnp.bfloat16) if name == "bf16" else state32
            R.cast_for_compute = (lambda model: model) if name == "fp32_direct" else original
            jax.clear_caches()
            t0 = time.perf_counter()
            first = call(state)
            first_s = time.perf_counter() - t0
            runs = [call(state) for _ in range(iters)]
            med = {k: float(np.median([r[k] for r in runs])) for k in runs[0]}
            res[f"{part}_{name}"] = {"first_call": first, "first_call_wall_s": first_s, "median": med,
                                     "runs": runs, "peak_gib_so_far": peak_gib()}
            log(f"{part} {name}: {med} (first call {first_s:.1f} s)")
            write_result(f"rollout_dtype_gpu_{part}", res)
            state = None
            gc.collect()
    finally:
        R.cast_for_compute = original


def run_ar(res: dict, batch: int, iters: int) -> None:
    cfg = ArConfig.from_hf(AR_CONFIG)
    model = random_module(lambda: GlmImageAR(cfg, dtype=jnp.bfloat16, param_dtype=jnp.float32, rngs=nnx.Rngs(0),
                                             implementation=ATTN, with_vision=False))
    graphdef, state32 = nnx.split(model)
    del model
    n_codes, eos = ar_token_ids(cfg)
    layout = ArLayout.t2i(H, W)
    arp = prompts(cfg, batch, layout, np.random.default_rng(0))
    res.update(ar_tokens=layout.n_tokens, ar_batch=batch,
               ar_params_b=sum(x.size for x in jax.tree.leaves(state32)) / 1e9)

    def call(state):
        t0 = time.perf_counter()
        tokens, _ = R.sample_group_tokens((graphdef, state), arp, jax.random.key(0), jnp.arange(batch),
                                          SAMPLING, n_codes=n_codes, eos_id=eos, gather=True)
        jax_sync(tokens)
        s = time.perf_counter() - t0
        return {"rollout_s": s, "steps_per_s": (layout.n_tokens - 1) / s}

    run(res, "ar", call, state32, iters)


def run_dit(res: dict, group: int, iters: int) -> None:
    from glm_jax.models.dit import DiTConfig, GlmImageDiT
    from glm_jax.models.vae import AutoencoderKL, VAEConfig
    c = DiTConfig.from_hf(DIT_CONFIG)
    model = random_module(lambda: GlmImageDiT(c, dtype=jnp.bfloat16, param_dtype=jnp.float32, attention=ATTN,
                                              rngs=nnx.Rngs(0)))
    graphdef, state32 = nnx.split(model)
    del model
    vae = nnx.split(random_module(lambda: AutoencoderKL(VAEConfig.from_hf(VAE_CONFIG), dtype=jnp.bfloat16,
                                                         param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))))
    layout = ArLayout.t2i(H, W)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, min(16384, c.prior_vq_quantizer_codebook_size), (1, layout.n_tokens)),
                         jnp.int32)
    glyph = jnp.asarray(rng.standard_normal((1, 256 if not SMOKE else 8, c.text_embed_dim)), jnp.float32)
    sched = flow_schedule(10, H, W, scheduler_config())
    cfg = R.DitRolloutConfig(group_size=group, num_steps=10, sde_window=3, guidance=1.0)
    res.update(dit_group=group, dit_steps=10, dit_params_b=sum(x.size for x in jax.tree.leaves(state32)) / 1e9)

    def call(state):
        timings: dict = {}
        roll = R.dit_group_rollout((graphdef, state), vae, tokens, layout, glyph, None, jax.random.key(1), cfg, sched,
                                   height=H, width=W, timings=timings)
        jax_sync(roll.images)
        return {k.split("/")[-1]: float(v) for k, v in timings.items()}

    run(res, "dit", call, state32, iters)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=("ar", "dit"), required=True)
    ap.add_argument("--batch", type=int, default=16, help="AR rows sampled together")
    ap.add_argument("--group", type=int, default=8, help="DiT SDE trajectories")
    ap.add_argument("--iters", type=int, default=2)
    args = ap.parse_args()
    res = {"device": device_info(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "variants": list(VARIANTS)}
    if args.part == "ar":
        run_ar(res, args.batch, args.iters)
    else:
        run_dit(res, args.group, args.iters)


if __name__ == "__main__":
    main()
