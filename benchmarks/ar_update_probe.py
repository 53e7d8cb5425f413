"""The AR GRPO update step with the processed policy's kept set sorting the fp32 masked-temperature logits
(`sort`) against sorting the head's bf16 logits (`sort16`, the default), in one process, timed round-robin
(JAX only, random bf16 weights). Each variant replaces `ar_sampler.kept_mask` while its step is traced.

    python -m benchmarks.ar_update_probe [--layers 4] [--batch 32] [--micro 8] [--rounds 3]

Same step as `benchmarks.train_gpu --part ar` (real width, reduced depth, 32 sequences of 62 prompt + 1280
generated tokens at 1024², AdamW; sampling as `glm_jax.train` does: temperature 0.9, top-k = the image codes,
top-p 0.75). Writes `$OUT/ar_update_probe.json`.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.common import SMOKE, ar_flops, device_info, jax_sync, prompts, random_module, write_result
from benchmarks.real_configs import AR_CONFIG
from glm_jax.grpo import optim as O
from glm_jax.grpo import train_step as T
from glm_jax.models.ar import ArConfig, GlmImageAR
from glm_jax.pipeline import ar_token_ids
from glm_jax.sampling import ar_sampler as S

PEAK = 989e12


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--micro", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--profile", action="store_true", help="also a kernel trace of one step of the default variant, "
                    "summarised by kernel and category (`benchmarks.trace_summary`)")
    a = ap.parse_args()
    if SMOKE:
        from glm_jax.tiny import tiny_ar_config
        conf, size, a.batch, a.micro = tiny_ar_config(), 64, 4, 2
    else:
        conf, size = dict(AR_CONFIG), 1024
        conf["text_config"] = dict(conf["text_config"], num_hidden_layers=a.layers)
    cfg = ArConfig.from_hf(conf)
    n_codes, eos = ar_token_ids(cfg)
    layout = S.ArLayout.t2i(size, size)
    rng = np.random.default_rng(0)
    p = prompts(cfg, a.batch, layout, rng)
    n = layout.n_tokens
    tokens = np.concatenate([rng.integers(0, n_codes, (a.batch, n - 1)), np.full((a.batch, 1), eos)], 1)
    seq = p.input_ids.shape[1] + n - 2
    flops = ar_flops(cfg, seq, a.batch)
    res = {"device": device_info(), "layers": cfg.text.num_layers, "batch": a.batch, "micro": a.micro,
           "tokens_per_seq": seq, "tflop": flops / 1e12}
    model = random_module(lambda: GlmImageAR(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                                             rngs=nnx.Rngs(0), implementation="cudnn" if not SMOKE else None))
    tx = O.make_optimizer(O.OptimConfig(lr=1e-6, grad_clip=1.0))
    graphdef, pol = T.init_policy(model, tx, T.ar_trainable, copy=False)
    model = None
    sampling = S.SamplingParams(temperature=0.9, top_k=n_codes, top_p=0.75)
    spec = T.ArSpec(graphdef, tx, T.ArLossConfig(n_codes=n_codes, eos_id=eos, sampling=sampling,
                                                 micro_batch=a.micro))
    arr = jnp.asarray
    batch = T.ArBatch(arr(p.input_ids), arr(p.attention_mask), arr(p.position_ids), arr(p.decode_positions),
                      arr(tokens.astype(np.int32)), jnp.broadcast_to(arr(layout.loss_mask()), (a.batch, n)),
                      arr(rng.standard_normal(a.batch).astype(np.float32)), jnp.ones((a.batch,), jnp.float32))
    ts = T.init_train_state(jax.random.key(0), ar=pol)
    pol = None
    default = S.kept_mask
    variants = {"sort": lambda z, params, order=None: default(z, params),   # the fp32 values sorted
                "sort16": default}                                           # the 16-bit logits sorted
    compiled = {}
    for name, impl in variants.items():
        S.kept_mask = impl          # read while the step is traced
        t0 = time.time()
        compiled[name] = T.ar_update_jit.lower(spec, ts, batch).compile()
        S.kept_mask = default
        jax.clear_caches()
        log(f"compiled {name} in {time.time() - t0:.0f}s")
    out = {name: {"median_s": []} for name in compiled}
    for name, fn in compiled.items():   # first steps (warm-up)
        ts, m = fn(ts, batch)
        jax_sync(m)
        out[name]["loss"] = float(m["loss"])
    for r in range(a.rounds):
        for name, fn in compiled.items():
            times = []
            for _ in range(a.iters):
                t0 = time.perf_counter()
                ts, m = fn(ts, batch)
                jax_sync(m)
                times.append(time.perf_counter() - t0)
            out[name]["median_s"].append(float(np.median(times)))
        log(f"round {r}: " + ", ".join(f"{k} {v['median_s'][-1]:.4f}s" for k, v in out.items()))
    for name, v in out.items():
        v["mean_median_s"] = float(np.mean(v["median_s"]))
        v["mfu"] = flops / v["mean_median_s"] / PEAK
        log(f"{name}: mean {v['mean_median_s']:.4f}s, MFU {v['mfu']:.1%}")
    res["variants"] = out
    if a.profile:
        import tempfile

        from benchmarks.trace_summary import summarise
        tdir = tempfile.mkdtemp(prefix="trace_ar_update_")
        with jax.profiler.trace(tdir, create_perfetto_trace=True):
            ts, m = compiled["sort16"](ts, batch)
            jax_sync(m)
        res["profile"] = summarise(tdir, top=40, steps=1)
        for c, v in res["profile"]["categories"].items():
            log(f"{c}: {v['us_per_step'] / 1e3:.1f} ms, {v['calls_per_step']:.0f} kernels")
        for row in res["profile"]["top"][:15]:
            log(f"  {row['us_per_step'] / 1e3:7.2f} ms  x{row['calls_per_step']:.0f}  {row['name'][:90]}")
    write_result("ar_update_probe", res)


if __name__ == "__main__":
    main()
