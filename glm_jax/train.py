"""GRPO training of GLM-Image: `python -m glm_jax.train --config configs/t2i.py[:variants] --workdir DIR
[--config.a.b=value ...]`.

One iteration (per `component`):

    data batch (P prompts + targets) -> prompt ids -> glyph conditions
    ar:   AR group rollout (P x G_ar token samples, rendered by the DiT ODE with x_T shared per group)
          -> AR reward set -> group advantages -> AR update
    dit:  one AR sample per prompt -> DiT group rollout (P x G_dit SDE trajectories) -> DiT reward set
          -> group advantages -> DiT update
    both: the two above in that order within one iteration, each policy with its own optimizer, learning rate and
          reward set; the DiT rollout reuses the first AR sample of each group as its prior tokens, and the AR's
          reward images are rendered by the DiT as it was at the start of the iteration.

The workdir holds `config.json` (the resolved config), `checkpoints/` (orbax, every `checkpoint.every` steps and
at the end, the last `checkpoint.keep` kept, asynchronous and atomic), `tensorboard/` and `images/` (PNG grids of
each sampled group with every image's reward). A rerun with the same workdir resumes from the newest complete
checkpoint (trained params, optimizer states, step, RNG and data position); SIGTERM / SIGINT save and exit.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

ERRORS = (ValueError, TypeError, FileNotFoundError)


def _parse(argv):
    ap = argparse.ArgumentParser(prog="python -m glm_jax.train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="configs/<mode>.py[:variant,variant...]")
    ap.add_argument("--workdir", required=True, help="checkpoints, logs and images go here; reruns resume")
    args, rest = ap.parse_known_args(argv)
    overrides = {}
    i = 0
    while i < len(rest):
        item = rest[i]
        if not item.startswith("--config."):
            ap.error(f"unrecognised argument {item!r} (config overrides look like --config.train.steps=100)")
        key, eq, value = item[len("--config."):].partition("=")
        if not eq:
            if i + 1 >= len(rest):
                ap.error(f"{item} needs a value")
            value, i = rest[i + 1], i + 1
        overrides[key] = value
        i += 1
    return args, overrides


def _check_supported(cfg) -> None:
    from glm_jax.config import ConfigError
    if cfg.mode != "t2i":
        raise ConfigError("config.mode: 'i2i' training is not available in this version (generation and rewards "
                          "support editing; the I2I rollout is not wired into the trainer yet)")
    if cfg.lora.enabled:
        raise ConfigError("config.lora.enabled: LoRA fine-tuning is not available in this version; use full "
                          "fine-tuning (the 'full' variant)")
    if cfg.ema.decay > 0:
        raise ConfigError("config.ema.decay: EMA is not available in this version; set it to 0")


def sync(tree) -> float:
    """Blocks until `tree` is computed (dispatch is asynchronous) so that a timer around its step is honest;
    returns 0.0 for use in sums."""
    import jax
    jax.block_until_ready(tree)
    return 0.0


def _captions(components: dict, total: np.ndarray) -> list[str]:
    out = []
    for i in range(len(total)):
        parts = [f"R={total[i]:.3f}"] + [f"{k}={v[i]:.3f}" for k, v in components.items()]
        out.append("\n".join(parts))
    return out


def glyph_length(prompt: str) -> int:
    """Glyph tokens T of one prompt: the ByT5 ids of all its quoted strings (`glm_jax.glyph` rules)."""
    from glm_jax.glyph import glyph_texts, glyph_token_ids
    return sum(len(ids) for ids in glyph_token_ids(glyph_texts(prompt)))


def pad_prompts(arp, length: int, pad_id: int):
    """Left-pads an `ArPrompts` batch to `length` tokens (padding is masked out, so results are unchanged;
    fixed shapes keep the rollout and update compiled once)."""
    extra = length - arp.input_ids.shape[1]
    if extra < 0:
        raise ValueError(f"prompt batch of {arp.input_ids.shape[1]} tokens is longer than the padded {length}")
    if extra == 0:
        return arp
    ids = np.pad(arp.input_ids, ((0, 0), (extra, 0)), constant_values=pad_id)
    mask = np.pad(arp.attention_mask, ((0, 0), (extra, 0)), constant_values=0)
    pos = np.pad(arp.position_ids, ((0, 0), (0, 0), (extra, 0)), constant_values=1)
    return arp._replace(input_ids=ids, attention_mask=mask, position_ids=pos)


def pad_glyph(glyph, length: int):
    """Left-pads glyph embeddings `[B, T, D]` with zero vectors to `length`, as the pipeline pads a batch to its
    longest prompt (the DiT attends to the zeros; a fixed length makes every batch look like one whose longest
    prompt has `length` glyph tokens)."""
    import jax.numpy as jnp
    extra = length - glyph.shape[1]
    return glyph if extra <= 0 else jnp.pad(glyph, ((0, 0), (extra, 0), (0, 0)))


def train(cfg, workdir: str, *, log=print, stop_after: int | None = None) -> dict:
    import jax
    import jax.numpy as jnp

    from glm_jax import data as D
    from glm_jax.config import save_config
    from glm_jax.grpo import optim as O
    from glm_jax.grpo import rollout as R
    from glm_jax.grpo import train_step as T
    from glm_jax.grpo.advantages import compute_advantages
    from glm_jax.monitor import Monitor, image_grid
    from glm_jax.pipeline import GlmImageStack, ar_prompts_from_batch, glyph_conditions
    from glm_jax.rewards import RewardContext, build_reward_sets
    from glm_jax.sampling.ar_sampler import SamplingParams
    from glm_jax.train_checkpoint import StopSignal, TrainCheckpointer

    _check_supported(cfg)
    os.makedirs(workdir, exist_ok=True)
    save_config(cfg, os.path.join(workdir, "config.json"))
    H, W = cfg.image.height, cfg.image.width
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[cfg.model.dtype]
    use_ar, use_dit = cfg.component in ("ar", "both"), cfg.component in ("dit", "both")

    rewards = build_reward_sets({"ar": cfg.reward.ar.to_dict() if use_ar else {},
                                 "dit": cfg.reward.dit.to_dict() if use_dit else {},
                                 "options": cfg.reward.options.to_dict()})
    train_ds, _ = D.load_splits(cfg.data.path, cfg.mode, cfg.data.eval_path)
    it = D.train_iterator(train_ds, cfg.train.groups_per_step, seed=cfg.seed, shuffle=cfg.data.shuffle,
                          process_index=jax.process_index(), process_count=jax.process_count())
    if cfg.model.ckpt:
        stack = GlmImageStack.load(cfg.model.ckpt, dtype=dtype, dit_remat=cfg.model.remat,
                                   attention=cfg.model.attention or None)
    else:
        stack = GlmImageStack.tiny(cfg.seed, dtype=dtype, dit_remat=cfg.model.remat)
    stack.prompts.check_target_size(H, W)
    # static shapes: every batch is padded to the longest prompt / glyph sequence of the dataset
    all_prompts = [e.prompt for e in train_ds.examples]
    max_len = int(stack.prompts.build_t2i(all_prompts, H, W).input_ids.shape[1])
    max_glyph = max(glyph_length(p) for p in all_prompts)
    log(f"data: {len(train_ds)} training examples from {cfg.data.path}; model: "
        f"{cfg.model.ckpt or 'embedded tiny GLM-Image'}; component: {cfg.component}")

    sampling = SamplingParams(temperature=cfg.ar.temperature, top_k=cfg.ar.top_k or stack.n_codes,
                              top_p=cfg.ar.top_p)
    policies, specs, lr_fns = {}, {}, {}
    if use_ar:
        tx = O.make_optimizer(O.OptimConfig.from_config(cfg.ar, cfg.train.steps))
        lr_fns["ar"] = O.lr_schedule(O.OptimConfig.from_config(cfg.ar, cfg.train.steps))
        graphdef, policies["ar"] = T.init_policy(stack.ar.merge(), tx, T.ar_trainable)
        specs["ar"] = T.ArSpec(graphdef, tx, T.ArLossConfig(
            n_codes=stack.n_codes, eos_id=stack.eos_id, sampling=sampling, eps_low=cfg.ar.epsilon,
            eps_high=cfg.ar.epsilon_high, loss_type=cfg.ar.loss_type, beta=cfg.ar.beta,
            micro_batch=cfg.train.micro_batch))
    if use_dit:
        tx = O.make_optimizer(O.OptimConfig.from_config(cfg.dit, cfg.train.steps))
        lr_fns["dit"] = O.lr_schedule(O.OptimConfig.from_config(cfg.dit, cfg.train.steps))
        graphdef, policies["dit"] = T.init_policy(stack.dit.merge(), tx, T.dit_trainable)
        specs["dit"] = T.DitSpec(graphdef, tx, T.DitLossConfig(
            clip_range=cfg.dit.clip_range, adv_clip=cfg.reward.adv_clip, beta=cfg.dit.beta, kernel=cfg.dit.kernel,
            guidance=cfg.dit.guidance, micro_batch=cfg.train.micro_batch))
    ts = T.init_train_state(jax.random.key(cfg.seed), ar=policies.get("ar"), dit=policies.get("dit"))
    refs = {k: jax.tree.map(jnp.copy, p.params) for k, p in policies.items() if cfg[k].beta > 0}

    ckpt = TrainCheckpointer(os.path.join(workdir, "checkpoints"), every=cfg.checkpoint.every,
                             keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save)

    def saved(ts):
        out = {"step": ts.step, "rng": jax.random.key_data(ts.rng)}
        for k in policies:
            p = getattr(ts, k)
            out[k] = {"params": p.params, "opt_state": p.opt_state}
        return out

    start = 0
    if ckpt.latest_step() is not None:
        step, restored, meta = ckpt.restore(saved(ts))
        ts = ts._replace(step=restored["step"], rng=jax.random.wrap_key_data(restored["rng"]),
                         **{k: getattr(ts, k)._replace(params=restored[k]["params"],
                                                       opt_state=restored[k]["opt_state"]) for k in policies})
        it.restore(meta["data"])
        start = step
        log(f"resumed from {ckpt.directory} at step {step}")

    monitor = Monitor(workdir, total_steps=cfg.train.steps, start_step=start, is_main=jax.process_index() == 0)
    stop = StopSignal()
    render_sched = stack.schedule(cfg.ar.decode_steps, H, W)
    dit_sched = stack.schedule(cfg.dit.num_steps, H, W)
    ar_rcfg = R.ArRolloutConfig(group_size=cfg.ar.group_size, sampling=sampling, decode_steps=cfg.ar.decode_steps,
                                decode_guidance=cfg.ar.decode_guidance, same_latent=True)
    dit_rcfg = R.DitRolloutConfig(group_size=cfg.dit.group_size, num_steps=cfg.dit.num_steps,
                                  noise_level=cfg.dit.noise_level, kernel=cfg.dit.kernel,
                                  sde_window=cfg.dit.sde_window, timestep_fraction=cfg.dit.timestep_fraction,
                                  guidance=cfg.dit.guidance)
    guidance_needed = (use_ar and cfg.ar.decode_guidance > 1) or (use_dit and cfg.dit.guidance > 1)
    history: list[dict] = []
    step = start
    try:
        for step in range(start + 1, cfg.train.steps + 1):
            t_iter = time.perf_counter()
            times: dict[str, float] = {}
            batch = next(it)
            prompts = list(batch.prompts)
            pb = stack.prompts.build_t2i(prompts, H, W)
            arp = pad_prompts(ar_prompts_from_batch(pb), max_len, stack.prompts.pad_id)
            glyph, neg = glyph_conditions(stack.t5, prompts, negative=guidance_needed, dtype=dtype)
            glyph = pad_glyph(glyph, max_glyph)
            key = jax.random.fold_in(jax.random.key(cfg.seed), step)
            metrics: dict[str, float] = {}

            def score(part, images, group_ids, g, prompts=prompts, batch=batch, times=times, metrics=metrics,
                      step=step):
                """Rewards of one rollout (each prompt's target repeated over its group) -> advantages; logs the
                reward / advantage metrics and, every `log.images_every` steps, the group grid."""
                t0 = time.perf_counter()
                ctx = RewardContext.make([p for p in prompts for _ in range(g)],
                                         targets=[t for t in batch.targets for _ in range(g)])
                res = rewards[part](images, ctx)
                times[f"time/{part}_rewards_s"] = time.perf_counter() - t0
                adv = compute_advantages(res.components, np.asarray(group_ids), reward_weights=rewards[part].weights,
                                         scale_rewards=cfg.reward.scale_rewards, aggregation=cfg.reward.aggregate,
                                         clip=cfg.reward.adv_clip)
                metrics.update({f"{part}/adv/{k}": float(v) for k, v in adv.metrics.items()})
                metrics.update({f"{part}/reward/{k}": v for k, v in res.metrics.items()})
                metrics[f"{part}/reward/total_mean"] = float(np.nanmean(res.total))
                metrics[f"{part}/reward/total_std"] = float(np.nanstd(res.total))
                if cfg.log.images_every and step % cfg.log.images_every == 0:
                    monitor.image(step, f"train/{part}_groups",
                                  image_grid(images, columns=g, captions=_captions(res.components, res.total)))
                return adv

            def record(part, m, metrics=metrics):
                metrics.update({f"{part}/{k}": float(v) for k, v in m.items()})

            tokens_for_dit = None
            dit_split = ((specs["dit"].graphdef, T.policy_split(specs["dit"].graphdef, ts.dit)[1]) if use_dit
                         else stack.dit)
            if use_ar:
                t0 = time.perf_counter()
                g = cfg.ar.group_size
                ar_split = (specs["ar"].graphdef, T.policy_split(specs["ar"].graphdef, ts.ar)[1])
                roll = R.ar_group_rollout(ar_split, dit_split, stack.vae, arp, glyph, neg, jax.random.fold_in(key, 0),
                                          ar_rcfg, render_sched, n_codes=stack.n_codes, eos_id=stack.eos_id,
                                          height=H, width=W, first_sample_id=step * 1_000_000,
                                          first_group_id=step * 10_000)
                images = np.asarray(roll.images)
                times["time/ar_rollout_s"] = time.perf_counter() - t0
                adv = score("ar", images, roll.group_ids, g)
                t0 = time.perf_counter()
                ts, m = T.ar_train_on_rollout(specs["ar"], ts, R.ar_batch(roll, adv.advantages, adv.weights),
                                              cfg.train.num_iterations, refs.get("ar"))
                times["time/ar_update_s"] = time.perf_counter() - t0 + sync(m)
                record("ar", m[-1])
                tokens_for_dit = R.first_of_groups(roll.tokens, g)
            if use_dit:
                if tokens_for_dit is None:
                    t0 = time.perf_counter()
                    tokens_for_dit, _ = R.sample_group_tokens(stack.ar, arp, jax.random.fold_in(key, 1),
                                                              jnp.arange(len(prompts)) + step * 1_000_000,
                                                              sampling, n_codes=stack.n_codes, eos_id=stack.eos_id)
                    times["time/ar_rollout_s"] = time.perf_counter() - t0 + sync(tokens_for_dit)
                t0 = time.perf_counter()
                g = cfg.dit.group_size
                # the AR update donated `ts`, so the DiT's current params are taken from the new state
                dit_split = (specs["dit"].graphdef, T.policy_split(specs["dit"].graphdef, ts.dit)[1])
                droll = R.dit_group_rollout(dit_split, stack.vae, tokens_for_dit, arp.layout, glyph, neg,
                                            jax.random.fold_in(key, 2), dit_rcfg, dit_sched, height=H, width=W,
                                            first_sample_id=step * 1_000_000, first_group_id=step * 10_000)
                images = np.asarray(droll.images)
                times["time/dit_rollout_s"] = time.perf_counter() - t0
                adv = score("dit", images, droll.group_ids, g)
                t0 = time.perf_counter()
                ts, m = T.dit_train_on_rollout(specs["dit"], ts, R.dit_batch(droll, adv.advantages, adv.weights),
                                               cfg.train.num_iterations, refs.get("dit"))
                times["time/dit_update_s"] = time.perf_counter() - t0 + sync(m)
                record("dit", m[-1])
            dt = time.perf_counter() - t_iter
            n_images = len(prompts) * ((cfg.ar.group_size if use_ar else 0) + (cfg.dit.group_size if use_dit else 0))
            metrics.update(times)
            metrics.update({f"{k}/learning_rate": float(fn(step - 1)) for k, fn in lr_fns.items()})
            metrics["time/iteration_s"] = dt
            metrics["throughput/images_per_s"] = n_images / dt
            history.append(metrics)
            if cfg.log.every and step % cfg.log.every == 0:
                monitor.scalars(step, metrics)
                monitor.summary(step, metrics, [k for k in ("ar/reward/total_mean", "dit/reward/total_mean",
                                                            "ar/loss", "dit/loss") if k in metrics])
            monitor.advance(step)
            if ckpt.should_save(step) or step == cfg.train.steps or stop.requested:
                ckpt.save(step, saved(ts), {"data": it.state(), "time": time.time()}, force=True)
            if stop.requested:
                log(f"{stop.signal_name}: saved step {step}; exiting")
                break
            if stop_after is not None and step >= stop_after:
                ckpt.save(step, saved(ts), {"data": it.state(), "time": time.time()}, force=True)
                break
    finally:
        ckpt.close()
        monitor.close()
        stop.restore_handlers()
    log(f"checkpoints: {ckpt.directory}\ntensorboard: tensorboard --logdir {os.path.join(workdir, 'tensorboard')}"
        f"\nimage grids: {os.path.join(workdir, 'images')}")
    return {"step": step, "history": history}


def main(argv: list[str] | None = None) -> int:
    from glm_jax.config import ConfigError, apply_overrides, load_config, validate
    args, overrides = _parse(argv)
    try:
        cfg = validate(apply_overrides(load_config(args.config), overrides))
        train(cfg, args.workdir, log=lambda m: print(m, file=sys.stderr, flush=True))
    except ConfigError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except ERRORS as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
