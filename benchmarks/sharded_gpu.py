"""GRPO updates of the real-size DiT (6.93B) or AR (10.1B text decoder) on a mesh over the GPUs of one host:
full fine-tuning or LoRA, one process with every GPU or one process per GPU.

    python -m benchmarks.sharded_gpu --part dit [--lora 0] [--remat dots] [--samples-per-device 1] [--tag T]
    python -m benchmarks.sharded_gpu --part ar --lora 64 [--batch-per-device 8] [--micro 4]
    python -m glm_jax.launch --nproc 2 --module benchmarks.sharded_gpu -- --part dit      # 2 processes
    python -m benchmarks.sharded_gpu --part ar --lora 64 --compile-only 1,2,4,8   # XLA's memory per micro-batch
    python -m benchmarks.sharded_gpu --part ar --batch-per-device 2 --micro 4 --gather-trained  # mesh.gather_trained
    python -m benchmarks.sharded_gpu --part dit --dit-steps 3 [--gather-trained]   # 3 micro-batches per update

The mesh is `fsdp` over every device of every process (`glm_jax.sharding.make_mesh`). Random bf16 weights are
generated straight into their shardings (each device draws its own slices), the train state (fp32 Adam moments)
is built by one jit with the state's out-shardings, and the update is `sharding.ShardedUpdate` (one SDE
transition per DiT sample at 1024²; for the AR, whole 1024² T2I sequences of prompt + 1281 tokens under the top-p
policy, micro-batched). Reports the median step time of 3 steps after the compile, samples/s, MFU and the peak
memory of every device (MFU from model FLOPs: forward + backward = 3x the forward, 2x under LoRA, whose
frozen kernels get no weight gradients). `--layers N` keeps the first N layers (to compare with one GPU where the full model does
not fit). Process 0 writes `$OUT/sharded_gpu_<tag>.json` as it goes.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse
import dataclasses
import time

from glm_jax import distributed

PEAK = 989e12


def log(msg: str) -> None:
    import jax
    if jax.process_index() == 0:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def peaks() -> list[float]:
    """Peak GiB in use of every device of every process (process order)."""
    import jax
    import numpy as np
    out = []
    for d in jax.local_devices():
        try:
            out.append(d.memory_stats().get("peak_bytes_in_use", 0) / 2 ** 30)
        except Exception:
            out.append(float("nan"))
    return [round(float(x), 2) for x in distributed.gather_rows(np.asarray(out, np.float64))]


def train_state(module, trainable, lora_rank: int, mesh):
    """`(graphdef, TrainState, tx)` of `module` on `mesh`: LoRA adapters of rank `lora_rank` added first when it
    is > 0 (then only they are trained), AdamW with global-norm clip and fp32 moments, the state made by one jit
    with its shardings as outputs (no host copy, nothing replicated on the way; the module's buffers are donated to
    it, so the module must not be used afterwards)."""
    import jax
    from flax import nnx

    from glm_jax import sharding as S
    from glm_jax.grpo import optim as O
    from glm_jax.grpo import train_step as T
    if lora_rank:
        from glm_jax.lora import LoraConfig, add_lora, lora_trainable
        with jax.set_mesh(mesh):
            add_lora(module, LoraConfig(rank=lora_rank, alpha=float(lora_rank)), rngs=nnx.Rngs(1))
        trainable = lora_trainable
    tx = O.make_optimizer(O.OptimConfig(lr=1e-5, grad_clip=1.0, weight_decay=1e-4))
    graphdef, params, frozen = nnx.split(module, trainable, ...)
    part = "dit" if type(module).__name__.endswith("DiT") else "ar"

    def make(p, f):
        return T.init_train_state(jax.random.key(0), **{part: T.PolicyState(p, f, tx.init(p))})
    sh = S.train_state_shardings(jax.eval_shape(make, params, frozen), mesh)
    ts = jax.jit(make, out_shardings=sh, donate_argnums=(0, 1))(params, frozen)   # no second copy of the weights
    return graphdef, ts, tx


def dit_case(a, mesh, n_dev):
    import jax.numpy as jnp
    import numpy as np

    from benchmarks.common import SMOKE
    from benchmarks.real_configs import DIT_CONFIG
    from glm_jax.grpo import train_step as T
    from glm_jax.models.dit import DiTConfig, GlmImageDiT, dit_flops
    from glm_jax.sampling import flow
    from glm_jax.sampling.schedule import flow_schedule
    from glm_jax.tiny import scheduler_config, tiny_dit_config
    h = w = 256 if SMOKE else 1024
    conf = dict(tiny_dit_config() if SMOKE else DIT_CONFIG)
    if a.layers:
        conf["num_layers"] = a.layers
    cfg = DiTConfig.from_hf(conf)
    attn = default_attention(a)

    def build():
        from flax import nnx
        return GlmImageDiT(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, attention=attn, rngs=nnx.Rngs(0))

    b = a.samples_per_device * n_dev
    rng = np.random.default_rng(0)
    sched = flow_schedule(10, h, w, scheduler_config())
    lat = (h // 8, w // 8, 16)
    t_glyph = a.glyph or (8 if SMOKE else 256)
    j = a.dit_steps
    x = rng.standard_normal((b, j, *lat)).astype(np.float32)
    cond = flow.make_cond(jnp.asarray(rng.standard_normal((b, t_glyph, cfg.text_embed_dim)), jnp.bfloat16),
                          jnp.asarray(rng.integers(0, 100 if SMOKE else 16384, (b, (h // 16) * (w // 16)))), h, w)
    batch = T.DitBatch(x=x, x_next=(x + 0.01 * rng.standard_normal(x.shape)).astype(np.float32),
                       steps=np.tile(np.arange(3, 3 + j, dtype=np.int32), (b, 1)),
                       advantages=rng.standard_normal(b).astype(np.float32),
                       weights=np.ones((b,), np.float32), cond=cond,
                       sched=(np.asarray(sched.timesteps), np.asarray(sched.sigmas)),
                       noise_level=np.asarray(0.7, np.float32))
    # forward + backward: 3x the forward (2x without weight gradients: LoRA on frozen kernels)
    flops = (2 if a.lora else 3) * dit_flops(cfg, (h // 16) * (w // 16), t_glyph, 0) * b * j
    return build, batch, flops, b, {"dit_layers": cfg.num_layers, "resolution": h, "glyph_tokens": t_glyph}


def default_attention(a) -> str | None:
    """`--attention`, else the trainer's automatic choice for bf16 on this backend (`resolve_attention`: cuDNN on
    a GPU, XLA's elsewhere): the DiT's, and the AR's teacher-forced pass."""
    import jax
    import jax.numpy as jnp

    from glm_jax.pipeline import resolve_attention
    return resolve_attention(a.attention, dtype=jnp.bfloat16, backend=jax.default_backend())


def ar_case(a, mesh, n_dev):
    import jax.numpy as jnp
    import numpy as np

    from benchmarks.common import SMOKE, ar_flops, prompts
    from benchmarks.real_configs import AR_CONFIG
    from glm_jax.grpo import train_step as T
    from glm_jax.models.ar import ArConfig, GlmImageAR
    from glm_jax.pipeline import ar_token_ids
    from glm_jax.sampling.ar_sampler import ArLayout
    from glm_jax.tiny import tiny_ar_config
    h = w = 256 if SMOKE else 1024
    conf = dict(tiny_ar_config() if SMOKE else AR_CONFIG)
    if a.layers:
        conf["text_config"] = dict(conf["text_config"], num_hidden_layers=a.layers)
    cfg = ArConfig.from_hf(conf)

    def build():
        from flax import nnx
        return GlmImageAR(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))

    n_codes, eos = ar_token_ids(cfg)
    layout = ArLayout.t2i(h, w)
    b = a.batch_per_device * n_dev
    rng = np.random.default_rng(0)
    p = prompts(cfg, b, layout, rng)
    n = layout.n_tokens
    tokens = np.concatenate([rng.integers(0, n_codes, (b, n - 1)), np.full((b, 1), eos)], 1).astype(np.int32)
    batch = T.ArBatch(p.input_ids, p.attention_mask, p.position_ids, p.decode_positions, tokens,
                      np.broadcast_to(layout.loss_mask(), (b, n)).copy(), rng.standard_normal(b).astype(np.float32),
                      np.ones((b,), np.float32))
    seq = p.input_ids.shape[1] + n - 2
    flops = ar_flops(cfg, seq, b, weight_grads=not a.lora)
    return build, batch, flops, b, {"ar_layers": cfg.text.num_layers, "tokens_per_seq": seq,
                                    "n_codes": n_codes, "eos": eos}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=("dit", "ar"), default="dit")
    ap.add_argument("--lora", type=int, default=0, help="LoRA rank (0: full fine-tuning)")
    ap.add_argument("--remat", default="dots")
    ap.add_argument("--layers", type=int, default=0, help="keep the first N layers (0: all)")
    ap.add_argument("--samples-per-device", type=int, default=1, help="DiT samples per device")
    ap.add_argument("--dit-steps", type=int, default=1, help="DiT SDE transitions per sample, one micro-batch "
                    "each (micro_steps=1)")
    ap.add_argument("--batch-per-device", type=int, default=8, help="AR sequences per device")
    ap.add_argument("--micro", type=int, default=4, help="AR micro-batch (global)")
    ap.add_argument("--attention", default="", help="'' = cuDNN on GPU, else 'xla' (DiT; the AR's "
                    "teacher-forced pass)")
    ap.add_argument("--glyph", type=int, default=0, help="DiT glyph tokens (0: 256, 8 in smoke mode); e.g. 251 "
                    "for a stream the DiT pads to a multiple of 8 rows")
    ap.add_argument("--gather-trained", action="store_true", help="gather the trained weights once per update "
                    "(config mesh.gather_trained) instead of per layer in every micro-batch")
    ap.add_argument("--tag", default="")
    ap.add_argument("--compile-only", default="", help="AR: comma-separated micro-batch sizes; compile the update "
                    "for each and record XLA's memory analysis (temporaries, arguments, outputs) without running")
    ap.add_argument("--profile", action="store_true", help="also a kernel trace of one more step (process 0): "
                    "GPU time by category and the top kernels into the JSON (`benchmarks.trace_summary`)")
    a = ap.parse_args(argv)
    distributed.initialize()
    import jax
    import numpy as np

    from benchmarks.common import device_info, jax_sync, random_module, write_result
    from glm_jax import sharding as S
    from glm_jax.grpo import train_step as T
    from glm_jax.sampling.ar_sampler import SamplingParams

    n_dev = jax.device_count()
    name = "sharded_gpu" + (f"_{a.tag}" if a.tag else "")
    res = {"device": device_info(), "part": a.part, "lora_rank": a.lora, "remat": a.remat, "devices": n_dev,
           "processes": jax.process_count(), "gather_trained": a.gather_trained}

    def save():
        if jax.process_index() == 0:
            write_result(name, res)

    mesh = S.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    build, batch, flops, b, info = (dit_case if a.part == "dit" else ar_case)(a, mesh, n_dev)
    res.update(info, samples=b)
    t0 = time.time()
    module = random_module(build, mesh=mesh)
    if a.part == "dit":
        module.remat = a.remat
    else:
        from glm_jax.pipeline import set_ar_train_attention
        module.text.remat = a.remat
        res["ar_train_attention"] = attn = default_attention(a)
        set_ar_train_attention(module, attn)
    graphdef, ts, tx = train_state(module, T.dit_trainable if a.part == "dit" else T.ar_trainable, a.lora, mesh)
    del module
    jax_sync(ts)
    pol = getattr(ts, a.part)
    res["trained_params"] = int(sum(np.prod(x.shape) for x in jax.tree.leaves(pol.params)))
    res["state_s"] = time.time() - t0
    res["state_peak_gib_per_device"] = peaks()
    log(f"train state ({res['trained_params']:,} trained) in {res['state_s']:.0f}s, peak per device "
        f"{res['state_peak_gib_per_device']}")
    save()

    if a.part == "dit":
        spec = T.DitSpec(graphdef, tx, T.DitLossConfig(clip_range=1e-4, beta=0.0, micro_steps=1,
                                                       gather_trained=a.gather_trained))
    else:
        spec = T.ArSpec(graphdef, tx, T.ArLossConfig(
            n_codes=info["n_codes"], eos_id=info["eos"], sampling=SamplingParams(temperature=0.9, top_k=None,
                                                                                  top_p=0.75),
            micro_batch=a.micro, gather_trained=a.gather_trained))
    if a.compile_only:
        res["compiled"] = {}
        batch_sh = S.batch_shardings(batch, mesh)
        for micro in (int(x) for x in a.compile_only.split(",")):
            spec_m = dataclasses.replace(spec, loss=dataclasses.replace(spec.loss, micro_batch=micro))
            t0 = time.time()
            fn = S.ShardedUpdate(a.part, spec_m, mesh, ts)._fn("update", batch_sh, None, batch)
            with jax.set_mesh(mesh):
                mem = fn.jitted.lower(ts, batch).compile().memory_analysis()
            row = {k: getattr(mem, f"{k}_size_in_bytes") / 2 ** 30 for k in ("temp", "argument", "output", "alias")}
            row["compile_s"] = time.time() - t0
            res["compiled"][micro] = row
            log(f"micro-batch {micro}: temporaries {row['temp']:.2f} GiB, arguments {row['argument']:.2f} GiB, "
                f"outputs {row['output']:.2f} GiB, compile {row['compile_s']:.0f}s")
            save()
        return
    step = S.ShardedUpdate(a.part, spec, mesh, ts)
    t0 = time.time()
    ts, m = step.update(ts, batch)
    jax_sync(m)
    res["compile_and_first_step_s"] = time.time() - t0
    res.update(first_loss=float(m["loss"]), first_grad_norm=float(m["grad_norm"]))
    log(f"first step (compile) {res['compile_and_first_step_s']:.0f}s, loss {float(m['loss']):.4g}, gradient norm "
        f"{float(m['grad_norm']):.6g}")
    save()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        ts, m = step.update(ts, batch)
        jax_sync(m)
        times.append(time.perf_counter() - t0)
    med = float(np.median(times))
    res.update(step_s=med, step_times=times, mfu=flops / med / PEAK / n_dev, samples_per_s=b / med,
               tflops_per_s_per_device=flops / med / n_dev / 1e12, peak_gib_per_device=peaks(),
               grad_norm=float(m["grad_norm"]))
    log(f"step {med:.3f}s for {b} samples, MFU {res['mfu']:.3f}, peak per device {res['peak_gib_per_device']}")
    save()
    if a.profile:
        import tempfile

        from benchmarks.trace_summary import summarise, summary_lines, timeline
        tdir = tempfile.mkdtemp(prefix="trace_sharded_")
        with jax.profiler.trace(tdir, create_perfetto_trace=True):
            ts, m = step.update(ts, batch)
            jax_sync(m)
        if jax.process_index() == 0:
            res["profile"] = summarise(tdir, top=40, steps=1)
            for line in summary_lines(res["profile"], top=25, width=100):
                log(line)
            res["timeline"] = tl = timeline(tdir)
            if tl:   # empty without GPU kernels (CPU)
                log(f"traced step: kernels span {tl['span_us'] / 1e3:.1f} ms, busy {tl['busy_us'] / 1e3:.1f} ms, "
                    f"idle {tl['idle_us'] / 1e3:.1f} ms in {tl['gaps']} gaps "
                    f"({tl['idle_in_gaps_under_10us'] / 1e3:.1f} ms in gaps of 10 us or less)")
                for g in tl["top_gaps"][:8]:
                    log(f"  gap {g['us'] / 1e3:.2f} ms after {g['after'][:70]} before {g['before'][:70]}")
            save()


if __name__ == "__main__":
    main()
