"""The AR GRPO update step in variants that each replace one part of the model or sampler while the step is traced,
compiled in one process and timed round-robin (JAX only, random bf16 weights):

* `sort16` (the default code): the processed policy's kept set sorts the head's bf16 logits, the MLP's gated
  activation has its hand-written backward pass (`ar_ops.gated_activation`, one `[gate; up]` gradient array);
* `sort`: the kept set sorts the logits cast to float32 instead (`ar_sampler.sort_keys`);
* `resort`: the re-scoring's remat saves nothing (`ar_sampler.SCORE_SAVED = ()`), so its backward pass runs the
  `lm_head` and sorts every chunk's logits again, as before 2026-11-29;
* `bounds_only`: it saves the kept set's bounds but not the chunk's logits (`lm_head` run again);
* `mlp_autodiff`: the MLP's `up * act(gate)` differentiated by JAX (`GLM_JAX_AR_KERNELS=0`; the split's
  transpose: a concatenation).

    python -m benchmarks.ar_update_probe [--variants sort16,mlp_autodiff] [--layers 4] [--batch 32] [--micro 8]
        [--rounds 3] [--hlo-count wrapped_concatenate] [--hlo] [--profile]

Same step as `benchmarks.train_gpu --part ar` (real width, reduced depth, 32 sequences of 62 prompt + 1280
generated tokens at 1024², AdamW; sampling as `glm_jax.train` does: temperature 0.9, top-k = the image codes,
top-p 0.75). Writes `$OUT/ar_update_probe.json`.
"""

from __future__ import annotations

import argparse
import os
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


_SORT_KEYS = S.sort_keys
VARIANTS = {   # name: ([(object, attribute, replacement)], {environment variable: value})
    "sort16": ([], {}),
    "sort": ([(S, "sort_keys", lambda logits, valid: _SORT_KEYS(logits.astype(jnp.float32), valid))], {}),
    "mlp_autodiff": ([], {"GLM_JAX_AR_KERNELS": "0"}),
    "resort": ([(S, "SCORE_SAVED", ())], {}),
    "bounds_only": ([(S, "SCORE_SAVED", (S.KEPT_BOUNDS,))], {}),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--micro", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--variants", default="sort,sort16", help="comma-separated: " + ", ".join(VARIANTS))
    ap.add_argument("--param-dtype", default="bfloat16", choices=("bfloat16", "float32"),
                    help="dtype of the trained weights (the trainer's `model.param_dtype`); compute stays bf16")
    ap.add_argument("--hlo-count", default="", help="log how often this word occurs in each variant's optimised HLO")
    ap.add_argument("--hlo", action="store_true", help="write each variant's optimised HLO (gzip) to $OUT")
    ap.add_argument("--profile", action="store_true", help="also a kernel trace of one step of the first variant, "
                    "summarised by kernel and category (`benchmarks.trace_summary`), and its kernels in launch order "
                    "(`$OUT/ar_update_probe_ops.tsv`: XLA instruction, kernel, microseconds; the instruction is "
                    "recorded with `XLA_FLAGS=--xla_gpu_enable_command_buffer=`)")
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
           "tokens_per_seq": seq, "tflop": flops / 1e12, "param_dtype": a.param_dtype}
    model = random_module(lambda: GlmImageAR(cfg, dtype=jnp.bfloat16, param_dtype=jnp.dtype(a.param_dtype),
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
    compiled, hlo_count, temp = {}, {}, {}
    for name in a.variants.split(","):
        patches, env = VARIANTS[name]
        saved = [(obj, attr, getattr(obj, attr)) for obj, attr, _ in patches]
        saved_env = {k: os.environ.get(k) for k in env}
        for obj, attr, value in patches:
            setattr(obj, attr, value)           # read while the step is traced
        os.environ.update(env)
        t0 = time.time()
        compiled[name] = T.ar_update_jit.lower(spec, ts, batch).compile()
        for obj, attr, value in saved:
            setattr(obj, attr, value)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v
        jax.clear_caches()
        mem = compiled[name].memory_analysis()
        temp[name] = None if mem is None else mem.temp_size_in_bytes / 2**30
        log(f"compiled {name} in {time.time() - t0:.0f}s, temporaries {temp[name]} GiB")
        if a.hlo:
            import gzip
            with gzip.open(os.path.join(os.environ.get("OUT", "out"), f"ar_update_probe_{name}.hlo.gz"), "wt") as f:
                f.write(compiled[name].as_text())
        if a.hlo_count:
            hlo_count[name] = compiled[name].as_text().count(a.hlo_count)
            log(f"{name}: {hlo_count[name]} x {a.hlo_count!r} in the optimised HLO")
    out = {name: {"median_s": []} for name in compiled}
    for name, fn in compiled.items():   # first steps (warm-up)
        ts, m = fn(ts, batch)
        jax_sync(m)
        out[name]["loss"] = float(m["loss"])
        out[name]["temp_gib"] = temp[name]
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
    if hlo_count:
        res["hlo_count"] = {"word": a.hlo_count, **hlo_count}
    if a.profile:
        import tempfile

        from benchmarks.trace_summary import summarise, summary_lines
        tdir = tempfile.mkdtemp(prefix="trace_ar_update_")
        with jax.profiler.trace(tdir, create_perfetto_trace=True):
            ts, m = next(iter(compiled.values()))(ts, batch)
            jax_sync(m)
        res["profile"] = summarise(tdir, top=40, steps=1)
        for line in summary_lines(res["profile"]):
            log(line)
        from benchmarks.trace_summary import op_sequence
        with open(os.path.join(os.environ.get("OUT", "out"), "ar_update_probe_ops.tsv"), "w") as f:
            f.writelines(f"{op}\t{k}\t{d:.1f}\n" for op, k, d in op_sequence(tdir))
    write_result("ar_update_probe", res)


if __name__ == "__main__":
    main()
