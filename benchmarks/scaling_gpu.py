"""Weak scaling of a whole DiT GRPO iteration at real size: the same work per GPU on 1, 2, 4, 8 GPUs.

    python -m benchmarks.scaling_gpu [--prompts-per-device 1] [--group 4] [--lora 64] [--tag T]
    CUDA_VISIBLE_DEVICES=0,1,2,3 python -m benchmarks.scaling_gpu ...            # 4 GPUs of the host
    python -m glm_jax.launch --nproc 4 --gpus-per-process 2 --module benchmarks.scaling_gpu -- ...

One iteration as `python -m glm_jax.train` runs it for `component = "dit"`, on a mesh `fsdp` over every device of
every process, with random bf16 weights drawn into their shardings (AR 10.1 B without its vision tower, DiT 6.93
B, VAE): AR sampling of one 1024² T2I token sequence per prompt (top-p 0.75), the DiT group rollout (G SDE
trajectories of 10 steps per prompt, a 3-step SDE window, no CFG), the VAE decode, an SSIM reward against random
targets scored by each process on its own rows, group advantages, and the DiT update (LoRA `--lora R`, or full
fine-tuning with `--lora 0`; remat `dots`; micro-batches of one trained SDE step of one sample per device). Prompts =
`--prompts-per-device x devices`, so each GPU does the same work at every scale; images/s per GPU is the weak
scaling measure (efficiency = images/s per GPU on N / on 1). Reports the median of 2 iterations after the first
(compile), the time per phase and peak memory per device; process 0 writes `$OUT/scaling_gpu_<tag>.json`.
JAX's default memory preallocation is kept, as in `glm_jax.train`: with `XLA_PYTHON_CLIENT_PREALLOCATE=false`
the LoRA update's 32.8 GiB of temporaries could not be placed after the AR sample (fragmentation, on 2 and 4
H100s). `--gather-dit 0` / `--gather-frozen 0` turn off `mesh.gather_dit` / `mesh.gather_frozen`.
"""

from __future__ import annotations

import argparse
import time

from glm_jax import distributed


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts-per-device", type=int, default=1)
    ap.add_argument("--group", type=int, default=4, help="SDE trajectories per prompt")
    ap.add_argument("--lora", type=int, default=64, help="LoRA rank of the DiT (0: full fine-tuning)")
    ap.add_argument("--steps", type=int, default=10, help="denoising steps of the rollout")
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--gather-dit", type=int, default=1,
                    help="1: the DiT's weights gathered once per SDE rollout (mesh.gather_dit); 0: per layer per step")
    ap.add_argument("--gather-frozen", type=int, default=1,
                    help="1: the update gathers the frozen (LoRA base) weights once (mesh.gather_frozen); 0: per "
                         "micro-batch")
    ap.add_argument("--tag", default="")
    a = ap.parse_args(argv)
    distributed.initialize()
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from benchmarks.common import SMOKE, device_info, jax_sync, random_module, write_result
    from benchmarks.common import prompts as random_prompts
    from benchmarks.real_configs import AR_CONFIG, DIT_CONFIG, VAE_CONFIG
    from benchmarks.sharded_gpu import log, peaks, train_state
    from glm_jax import sharding as S
    from glm_jax.grpo import rollout as R
    from glm_jax.grpo import train_step as T
    from glm_jax.grpo.advantages import compute_advantages
    from glm_jax.models.ar import ArConfig, GlmImageAR
    from glm_jax.models.dit import DiTConfig, GlmImageDiT
    from glm_jax.models.vae import AutoencoderKL, VAEConfig
    from glm_jax.pipeline import ar_token_ids
    from glm_jax.rewards import RewardContext, build_reward_sets
    from glm_jax.sampling.ar_sampler import ArLayout, SamplingParams
    from glm_jax.sampling.schedule import flow_schedule
    from glm_jax.tiny import scheduler_config

    ar_conf, dit_conf, vae_conf = AR_CONFIG, DIT_CONFIG, VAE_CONFIG
    h = w = 1024
    if SMOKE:
        from glm_jax.tiny import tiny_ar_config, tiny_dit_config, tiny_vae_config
        ar_conf, dit_conf, vae_conf, h, w = tiny_ar_config(), tiny_dit_config(), tiny_vae_config(), 64, 64
    n_dev, n_proc = jax.device_count(), jax.process_count()
    p_global = a.prompts_per_device * n_dev
    if p_global % n_proc:
        raise SystemExit(f"--prompts-per-device x {n_dev} devices = {p_global} prompts do not split over "
                         f"{n_proc} processes")
    mesh = S.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    attn = "cudnn" if jax.default_backend() == "gpu" else None
    res = {"device": device_info(), "devices": n_dev, "processes": n_proc, "prompts": p_global, "group": a.group,
           "lora_rank": a.lora, "steps": a.steps, "gather_dit": bool(a.gather_dit),
           "gather_frozen": bool(a.gather_frozen)}

    def save():
        if jax.process_index() == 0:
            write_result("scaling_gpu" + (f"_{a.tag}" if a.tag else ""), res)

    t0 = time.time()
    ar_cfg, dit_cfg = ArConfig.from_hf(ar_conf), DiTConfig.from_hf(dit_conf)

    def sharded(build):
        return random_module(build, mesh=mesh)
    ar = nnx.split(sharded(lambda: GlmImageAR(ar_cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                                              rngs=nnx.Rngs(0), with_vision=False)))
    vae = nnx.split(sharded(lambda: AutoencoderKL(VAEConfig.from_hf(vae_conf), dtype=jnp.bfloat16,
                                                  param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))))
    dit = sharded(lambda: GlmImageDiT(dit_cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, attention=attn,
                                      rngs=nnx.Rngs(0)))
    dit.remat = "dots"
    graphdef, ts, tx = train_state(dit, T.dit_trainable, a.lora, mesh)
    del dit
    n_samples = p_global * a.group
    spec = T.DitSpec(graphdef, tx, T.DitLossConfig(clip_range=1e-4, micro_batch=n_dev, micro_steps=1,
                                                   gather_frozen=bool(a.gather_frozen)))
    update = S.ShardedUpdate("dit", spec, mesh, ts)
    res["setup_s"] = time.time() - t0
    log(f"models on a {n_dev}-device mesh ({n_proc} processes) in {res['setup_s']:.0f}s; peak per device "
        f"{peaks()}")

    n_codes, eos = ar_token_ids(ar_cfg)
    layout = ArLayout.t2i(h, w)
    rng = np.random.default_rng(0)
    arp = random_prompts(ar_cfg, p_global, layout, rng)
    t_glyph = 8 if SMOKE else 256
    glyph = rng.standard_normal((p_global, t_glyph, dit_cfg.text_embed_dim)).astype(np.float32)
    targets = rng.integers(0, 256, (p_global, h, w, 3), dtype=np.uint8)
    sched = flow_schedule(a.steps, h, w, scheduler_config())
    rcfg = R.DitRolloutConfig(group_size=a.group, num_steps=a.steps, sde_window=min(3, a.steps // 2),
                              noise_level=0.7, gather_weights=bool(a.gather_dit))
    sampling = SamplingParams(temperature=0.9, top_k=None, top_p=0.75)
    rewards = build_reward_sets({"dit": {"ssim": 1.0}})["dit"]
    per = p_global // n_proc
    mine = slice(jax.process_index() * per, (jax.process_index() + 1) * per)
    own = slice(mine.start * a.group, mine.stop * a.group)

    def iteration(i: int) -> dict:
        times = {}
        key = jax.random.key(i)
        t_all = time.perf_counter()
        with jax.set_mesh(mesh):
            t = time.perf_counter()
            tokens, _ = R.sample_group_tokens(ar, arp, jax.random.fold_in(key, 1), np.arange(p_global) + 1000 * i,
                                              sampling, n_codes=n_codes, eos_id=eos)
            jax_sync(tokens)
            times["ar_sample_s"] = time.perf_counter() - t
            policy = ts.dit
            current = (graphdef, nnx.merge_state(policy.params, policy.frozen))
            droll = R.dit_group_rollout(current, vae, tokens, layout, glyph.astype(jnp.bfloat16), None,
                                        jax.random.fold_in(key, 2), rcfg, sched, height=h, width=w,
                                        first_sample_id=i * 10_000, first_group_id=i * 10_000, timings=times)
        t = time.perf_counter()
        images = distributed.own_rows(droll.images, own)
        ctx = RewardContext.make([""] * len(images), targets=[targets[j // a.group + mine.start]
                                                             for j in range(len(images))])
        scores = rewards(images, ctx)
        comps = {k: distributed.gather_rows(v) for k, v in scores.components.items()}
        adv = compute_advantages(comps, np.repeat(np.arange(p_global), a.group), reward_weights=rewards.weights)
        times["rewards_s"] = time.perf_counter() - t
        t = time.perf_counter()
        new_ts, m = update.update(ts, R.dit_batch(droll, adv.advantages, adv.weights))
        jax_sync(m)
        times["update_s"] = time.perf_counter() - t
        times["iteration_s"] = time.perf_counter() - t_all
        times["loss"] = float(m["loss"])
        return new_ts, times

    runs = []
    for i in range(a.iterations):
        ts, times = iteration(i)
        runs.append(times)
        log(f"iteration {i}: " + ", ".join(f"{k}={v:.3f}" for k, v in times.items()))
    steady = runs[1:] or runs
    med = {k: float(np.median([r[k] for r in steady])) for k in steady[0]}
    med["images_per_s"] = n_samples / med["iteration_s"]
    med["images_per_s_per_device"] = med["images_per_s"] / n_dev
    res.update(first_iteration=runs[0], iteration=med, samples=n_samples, peak_gib_per_device=peaks())
    log(f"{n_samples} images per iteration in {med['iteration_s']:.2f}s: {med['images_per_s']:.3f} images/s, "
        f"{med['images_per_s_per_device']:.3f} per device; peak per device {res['peak_gib_per_device']}")
    save()


if __name__ == "__main__":
    main()
