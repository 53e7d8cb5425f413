"""Where the time of the real-size DiT forward + backward goes: JAX only, random bf16 weights, a kernel trace.

    python -m benchmarks.dit_train_probe --tag default [--remat none] [--profile] [--hlo] [--iters 5]
    XLA_FLAGS=--xla_gpu_enable_triton_gemm=false python -m benchmarks.dit_train_probe --tag notriton
    python -m benchmarks.dit_train_probe --tag ab --variants "kernels:;plain:GLM_JAX_DIT_KERNELS=0" --rounds 3

Same step as `benchmarks.train_gpu --part dit` (gradient of `<out, cotangent>` with respect to every parameter,
1024², 4096 image + 256 glyph tokens, batch 1, cuDNN attention) without the diffusers side, so that several
variants (XLA flags, remat policies) fit in one GPU call. `--profile` adds a `jax.profiler` trace of two steps,
summarised by kernel and by category (`benchmarks.trace_summary`), and the last step's kernels in launch order
(`$OUT/dit_train_probe_<tag>_ops.tsv`: XLA instruction, kernel, microseconds; the instruction is recorded with
`XLA_FLAGS=--xla_gpu_enable_command_buffer=`). `--variants` compiles the step once per set of environment
variables (and of XLA options: names starting with `xla_`, e.g. `lt:xla_gpu_enable_cublaslt=true`) and times
them round-robin in one process (an A/B on one card with the drift shared); `--hlo-count
WORD` logs how often WORD occurs in each variant's optimised HLO (e.g. whether a matmul epilogue took an op);
`--compare` checks each variant's gradients against the first's. `--glyph N` sets the glyph tokens (256).
Writes `$OUT/dit_train_probe_<tag>.json`.
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

from benchmarks.common import SMOKE, back_to_back, device_info, jax_sync, random_module, timeit, write_result
from benchmarks.real_configs import DIT_CONFIG
from glm_jax.models.dit import DiTConfig, GlmImageDiT, dit_flops

PEAK = 989e12
H = W = 256 if SMOKE else 1024
T_GLYPH = 5 if SMOKE else 256


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tag", default="default")
    ap.add_argument("--remat", default="none")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--param-dtype", default="bfloat16", choices=("bfloat16", "float32"),
                    help="dtype of the weights (the trainer's `model.param_dtype`); compute stays bf16")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--hlo", action="store_true", help="write the optimised HLO (gzip) to $OUT, to name fusions")
    ap.add_argument("--variants", default="",
                    help="'NAME:VAR=V,VAR=V;NAME:...': compile the step once per set of environment variables "
                         "(read while tracing; names starting with xla_ are passed to the compiler as XLA options "
                         "instead; a '+' in an option's value stands for ',', e.g. xla_gpu_enable_command_buffer="
                         "FUSION+CUBLAS) and time them interleaved in --rounds rounds, in one process")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--attention", default="", help="'' = cuDNN on a GPU (else XLA's), or 'xla'",
                    choices=("", "xla"))
    ap.add_argument("--pipelined", type=int, default=0,
                    help="with --variants: also time N steps dispatched back to back (one wait at the end, as a "
                         "training loop runs them) in each round, next to the steps waited on one by one")
    ap.add_argument("--glyph", type=int, default=None, help="glyph tokens (default 256; e.g. 251 for a stream "
                    "length the DiT pads for its GPU kernels)")
    ap.add_argument("--compare", action="store_true", help="with --variants: max relative difference of each "
                    "variant's parameter gradients (first and last block, embedders, output) to the first variant's")
    ap.add_argument("--hlo-count", default="", help="with --variants: log how often this word occurs in each "
                    "variant's optimised HLO (e.g. GELU, to see whether a matmul epilogue took it)")
    a = ap.parse_args()
    conf = DIT_CONFIG
    if SMOKE:
        from glm_jax.tiny import tiny_dit_config
        conf = tiny_dit_config()
    cfg = DiTConfig.from_hf(conf)
    on_gpu = jax.default_backend() == "gpu"
    attention = "cudnn" if on_gpu and a.attention == "" else None
    res = {"device": device_info(), "xla_flags": os.environ.get("XLA_FLAGS", ""), "tag": a.tag, "remat": a.remat,
           "param_dtype": a.param_dtype}
    t_glyph = a.glyph if a.glyph is not None else T_GLYPH
    res["glyph_tokens"] = t_glyph
    flops = 3 * dit_flops(cfg, (H // 16) * (W // 16), t_glyph, 0)
    res["tflop"] = flops / 1e12
    t0 = time.time()
    model = random_module(lambda: GlmImageDiT(cfg, dtype=jnp.bfloat16, param_dtype=jnp.dtype(a.param_dtype),
                                              attention=attention, remat=a.remat, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    log(f"random weights in {time.time() - t0:.0f}s")
    rng = np.random.default_rng(0)
    n = (H // 16) * (W // 16)
    lat = jnp.asarray(rng.standard_normal((1, H // 8, W // 8, cfg.in_channels)), jnp.bfloat16)
    cot = jnp.asarray(rng.standard_normal(lat.shape), jnp.bfloat16)
    args = (jnp.asarray(rng.standard_normal((1, t_glyph, cfg.text_embed_dim)), jnp.bfloat16),
            jnp.asarray(rng.integers(0, cfg.prior_vq_quantizer_codebook_size, (1, n)), jnp.int32),
            jnp.zeros((1, n), bool), jnp.asarray([979.0], jnp.float32), jnp.asarray([[H, W]], jnp.float32),
            jnp.zeros((1, 2), jnp.float32))

    def make_grad():   # a new function object per call: jit traces it afresh (variants differ only by environment)
        @jax.jit
        def grad(state, lat, args, cot):
            def f(s):
                out = nnx.merge(graphdef, s)(lat, *args)[0]
                return jnp.vdot(out.astype(jnp.float32), cot.astype(jnp.float32))
            return jax.grad(f)(state)
        return grad

    grad = make_grad()

    if a.variants:
        res["variants"] = run_variants(a, make_grad, (state, lat, args, cot), flops, cfg.num_layers - 1)
        write_result(f"dit_train_probe_{a.tag}", res)
        return
    t0 = time.time()
    compiled = grad.lower(state, lat, args, cot).compile()
    res["memory_gib"] = _memory_gib(compiled)
    log("compiled: " + ", ".join(f"{k} {v:.2f} GiB" for k, v in res["memory_gib"].items()))
    if a.hlo:
        import gzip
        with gzip.open(os.path.join(os.environ.get("OUT", "out"), f"dit_train_probe_{a.tag}.hlo.gz"), "wt") as f:
            f.write(compiled.as_text())
    grad = compiled
    jax_sync(grad(state, lat, args, cot))
    res["compile_s"] = time.time() - t0
    r = timeit(lambda: grad(state, lat, args, cot), sync=jax_sync, iters=a.iters)
    stats = jax.devices()[0].memory_stats() or {}
    r.update(tflops_per_s=flops / r["median_s"] / 1e12, mfu=flops / r["median_s"] / PEAK,
             peak_gib=stats.get("peak_bytes_in_use", 0) / 2 ** 30)
    res["fwd_bwd"] = r
    log(f"{a.tag} remat={a.remat}: {r['median_s']:.4f}s ({r['tflops_per_s']:.0f} TFLOP/s, MFU {r['mfu']:.1%}), "
        f"peak {r['peak_gib']:.1f} GiB, compile {res['compile_s']:.0f}s")
    if a.profile:
        from benchmarks.trace_summary import summarise
        tdir = os.path.join(os.environ.get("OUT", "out"), f"trace_dit_{a.tag}")
        with jax.profiler.trace(tdir, create_perfetto_trace=True):
            for _ in range(2):
                jax_sync(grad(state, lat, args, cot))
        res["profile"] = summarise(tdir, top=60, steps=2)
        from benchmarks.trace_summary import op_sequence
        with open(os.path.join(os.environ.get("OUT", "out"), f"dit_train_probe_{a.tag}_ops.tsv"), "w") as f:
            f.writelines(f"{op}\t{k}\t{d:.1f}\n" for op, k, d in op_sequence(tdir))
    write_result(f"dit_train_probe_{a.tag}", res)


def _memory_gib(compiled) -> dict:
    """The compiled step's argument / output / temporary / code memory in GiB (zeros where XLA reports none)."""
    mem = compiled.memory_analysis()
    return {k: (getattr(mem, f"{k}_size_in_bytes") if mem is not None else 0) / 2 ** 30
            for k in ("argument", "output", "temp", "generated_code")}


def _compared(path: str, last: int) -> bool:
    """The gradients `--compare` copies to the host: the first and last blocks and everything outside the blocks."""
    return "transformer_blocks" not in path or any(f"['transformer_blocks'][{i}]" in path for i in (0, last))


def _option(v: str):
    """A `--variants` XLA option's value: booleans and integers as such, anything else as the string."""
    if v.lower() in ("true", "false"):
        return v.lower() == "true"
    return int(v) if v.lstrip("-").isdigit() else v


def run_variants(a, make_grad, inputs, flops, last_block: int) -> dict:
    """Each variant compiled with its environment, then all timed round-robin (`--iters` steps each per round):
    card clock and temperature drift then affect every variant alike. The first executions go in decreasing
    order of the variants' temporary memory: the GPU allocator keeps the regions it has grown, and a larger
    request after a smaller one can fail on fragmentation where the reverse order fits."""
    compiled, out, temp = {}, {}, {}
    for spec in a.variants.split(";"):
        name, _, env = spec.partition(":")
        settings = dict(kv.split("=", 1) for kv in env.split(",") if kv)
        options = {k: _option(v.replace("+", ",")) for k, v in settings.items() if k.startswith("xla_")}
        pairs = {k: v for k, v in settings.items() if k not in options}
        saved = {k: os.environ.get(k) for k in pairs}
        os.environ.update(pairs)
        t0 = time.time()
        try:
            compiled[name] = make_grad().lower(*inputs).compile(compiler_options=options or None)
        except Exception as e:   # an option this XLA does not know, or a step that does not compile: skip it
            out[name] = {"env": pairs, "compiler_options": options, "error": f"{type(e).__name__}: {e}"[:2000]}
            log(f"variant {name} ({settings}) did not compile, skipped: {type(e).__name__}: {str(e)[:300]}")
            continue
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        temp[name] = _memory_gib(compiled[name])["temp"]
        out[name] = {"env": pairs, "compiler_options": options, "compile_s": time.time() - t0,
                     "temp_gib": temp[name], "median_s": []}
        log(f"compiled {name} ({settings}) in {out[name]['compile_s']:.0f}s, temporary {temp[name]:.2f} GiB")
        if a.hlo_count:
            out.setdefault("_hlo_count", {})[name] = compiled[name].as_text().count(a.hlo_count)
            log(f"{name}: {out['_hlo_count'][name]} x {a.hlo_count!r} in the optimised HLO")
    picked = {}
    for name in sorted(compiled, key=lambda n: -temp[n]):
        grads = compiled[name](*inputs)
        jax_sync(grads)
        if a.compare:
            leaves = ((jax.tree_util.keystr(p), g) for p, g in jax.tree_util.tree_leaves_with_path(grads))
            picked[name] = {k: np.asarray(g, np.float32) for k, g in leaves if _compared(k, last_block)}
        del grads
    first, *others = compiled
    for name in others if a.compare else ():
        reference = picked[first]
        errs = {k: float(np.max(np.abs(v - reference[k])) / max(np.max(np.abs(reference[k])), 1e-30))
                for k, v in picked[name].items()}
        worst = max(errs, key=errs.get)
        out.setdefault("_compare", {})[name] = {"leaves": len(errs), "max_rel": errs[worst], "worst": worst,
                                                "median_rel": float(np.median(list(errs.values())))}
        log(f"{name} vs {first}: {len(errs)} gradients, max relative difference {errs[worst]:.2e} ({worst}), "
            f"median {out['_compare'][name]['median_rel']:.2e}")
    for r in range(a.rounds):
        for name, fn in compiled.items():
            t = timeit(lambda: fn(*inputs), sync=jax_sync, iters=a.iters)["median_s"]
            out[name]["median_s"].append(t)
            if a.pipelined:
                out[name].setdefault("pipelined_s", []).append(back_to_back(fn, *inputs, calls=a.pipelined, runs=3))
        log(f"round {r}: " + ", ".join(f"{n} {out[n]['median_s'][-1]:.4f}s" for n in compiled))
        if a.pipelined:
            log(f"round {r}, {a.pipelined} steps back to back: "
                + ", ".join(f"{n} {out[n]['pipelined_s'][-1]:.4f}s" for n in compiled))
    for name, v in out.items():
        if name.startswith("_") or "error" in v:
            continue
        v["best_median_s"] = min(v["median_s"])
        v["mean_median_s"] = float(np.mean(v["median_s"]))
        v["mfu"] = flops / v["mean_median_s"] / PEAK
        if "pipelined_s" in v:
            v["mean_pipelined_s"] = float(np.mean(v["pipelined_s"]))
            log(f"{name}: {a.pipelined} back to back, mean {v['mean_pipelined_s']:.4f}s per step")
        log(f"{name}: mean {v['mean_median_s']:.4f}s, best {v['best_median_s']:.4f}s, MFU {v['mfu']:.1%}")
    return out


if __name__ == "__main__":
    main()
