"""Full fine-tuning of the real-size DiT (6.93B) at 1024² with FSDP over the GPUs of one host (one process).

    python -m benchmarks.sharded_gpu [--remat dots] [--samples-per-device 1]

Builds the DiT with random bf16 weights on the first device, shards the parameters over `fsdp` (= every device),
creates the fp32 Adam state directly in its sharding, and times the Flow-GRPO update (`glm_jax.sharding.
ShardedUpdate`, one SDE transition per sample, global-norm clip + AdamW) with the given rematerialisation.
Reports step time, MFU and peak memory per device. Writes $OUT/sharded_gpu.json as it goes.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.common import SMOKE, device_info, jax_sync, random_module, write_result
from benchmarks.real_configs import DIT_CONFIG

PEAK = 989e12
H = W = 256 if SMOKE else 1024
if SMOKE:
    from glm_jax.tiny import tiny_dit_config
    DIT_CONFIG = tiny_dit_config()


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def peaks() -> list[float]:
    out = []
    for d in jax.local_devices():
        try:
            out.append(d.memory_stats().get("peak_bytes_in_use", 0) / 2 ** 30)
        except Exception:
            out.append(float("nan"))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--remat", default="dots")
    ap.add_argument("--samples-per-device", type=int, default=1)
    ap.add_argument("--attention", default="", help="'' = cuDNN on GPU, else 'xla'")
    a = ap.parse_args()
    from glm_jax import sharding as S
    from glm_jax.grpo import optim as O
    from glm_jax.grpo import train_step as T
    from glm_jax.models.dit import DiTConfig, GlmImageDiT, dit_flops
    from glm_jax.sampling import flow
    from glm_jax.sampling.schedule import flow_schedule
    from glm_jax.tiny import scheduler_config

    n_dev = jax.device_count()
    res = {"device": device_info(), "remat": a.remat, "devices": n_dev}
    mesh = S.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    cfg = DiTConfig.from_hf(DIT_CONFIG)
    attn = a.attention or ("cudnn" if jax.default_backend() == "gpu" else None)
    res["attention"] = attn
    t0 = time.time()
    dit = random_module(lambda: GlmImageDiT(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, attention=attn,
                                            rngs=nnx.Rngs(0)))
    dit.remat = a.remat
    graphdef, params, frozen = nnx.split(dit, T.dit_trainable, ...)
    del dit
    params = jax.device_put(params, S.tree_shardings(params, mesh))
    tx = O.make_optimizer(O.OptimConfig(lr=1e-5, grad_clip=1.0, weight_decay=1e-4))

    def make_ts(p):
        return T.init_train_state(jax.random.key(0), dit=T.PolicyState(p, frozen, tx.init(p)))
    ts_sh = S.train_state_shardings(jax.eval_shape(make_ts, params), mesh)
    ts = jax.jit(make_ts, out_shardings=ts_sh, donate_argnums=0)(params)
    params = None
    jax_sync(ts)
    res["state_s"] = time.time() - t0
    res["state_peak_gib_per_device"] = peaks()
    log(f"sharded train state in {res['state_s']:.0f}s, peak per device {res['state_peak_gib_per_device']}")
    write_result("sharded_gpu", res)

    b = a.samples_per_device * n_dev
    rng = np.random.default_rng(0)
    sched = flow_schedule(10, H, W, scheduler_config())
    lat = (H // 8, W // 8, 16)
    t_glyph = 256 if not SMOKE else 8
    x = jnp.asarray(rng.standard_normal((b, 1, *lat)), jnp.float32)
    cond = flow.make_cond(jnp.asarray(rng.standard_normal((b, t_glyph, cfg.text_embed_dim)), jnp.bfloat16),
                          jnp.asarray(rng.integers(0, 16384 if not SMOKE else 100, (b, (H // 16) * (W // 16)))),
                          H, W)
    batch = T.DitBatch(x=x, x_next=x + 0.01 * jnp.asarray(rng.standard_normal(x.shape), jnp.float32),
                       steps=jnp.full((b, 1), 3, jnp.int32), advantages=jnp.asarray(rng.standard_normal(b),
                                                                                    jnp.float32),
                       weights=jnp.ones((b,), jnp.float32), cond=cond,
                       sched=(jnp.asarray(sched.timesteps), jnp.asarray(sched.sigmas)),
                       noise_level=jnp.asarray(0.7, jnp.float32))
    spec = T.DitSpec(graphdef, tx, T.DitLossConfig(clip_range=1e-4, beta=0.0))
    step = S.ShardedUpdate("dit", spec, mesh, ts)
    t0 = time.time()
    ts, m = step.update(ts, batch)
    jax_sync(m)
    res["compile_and_first_step_s"] = time.time() - t0
    log(f"first step (compile) {res['compile_and_first_step_s']:.0f}s, loss {float(m['loss']):.4g}")
    write_result("sharded_gpu", res)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        ts, m = step.update(ts, batch)
        jax_sync(m)
        times.append(time.perf_counter() - t0)
    med = float(np.median(times))
    flops = 3 * dit_flops(cfg, (H // 16) * (W // 16), t_glyph, 0) * b
    res.update(step_s=med, step_times=times, samples=b, mfu=flops / med / PEAK / n_dev,
               samples_per_s=b / med, peak_gib_per_device=peaks(), grad_norm=float(m["grad_norm"]))
    log(f"step {med:.3f}s for {b} samples, MFU {res['mfu']:.3f}, peak per device {res['peak_gib_per_device']}")
    write_result("sharded_gpu", res)


if __name__ == "__main__":
    main()
