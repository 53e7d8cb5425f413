"""AR decode-step variants on one GPU (real-size text decoder, random bf16 weights, JAX only).

Times a jitted loop of decode steps over a 1408-slot cache, as (t(N2) - t(N1)) / (N2 - N1) with a dynamic trip
count (one compile per variant and batch), for the decode-attention implementations, a fused q/k/v matmul and
the full sampling step (top-p sort + categorical; `sample16`: on the head's bf16 logits) against greedy argmax;
`pallas` is glm_jax's split-K decode kernel (`glm_jax.models.decode_ops`), `jaxpallas` JAX's own (deprecated). A
variant's name is read in parts: its first `+`-separated word picks greedy / `sample` / `sample16` (or `cudnn` /
`xla`: `dot_product_attention` over the cache), `pallas` / `jaxpallas` anywhere picks that kernel (else the einsum
step), `+fused` the one q/k/v matmul, `+plainnorm` the layer-by-layer norms (else each residual add fused with the
next norm, `ar_ops.add_rms_norm`, as the sampler runs). So `sample` alone samples with the einsum attention;
compare sampling with greedy on the same attention (`pallas,sample+pallas`). Run it once per XLA_FLAGS setting:

    XLA_FLAGS=... python -m benchmarks.ar_decode_probe --tag default --variants einsum,cudnn,sample
    python -m benchmarks.ar_decode_probe --tag samplecost --variants pallas,sample+pallas --batches 32,128
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

from benchmarks.common import SMOKE, device_info, jax_sync, random_module, timeit, write_result
from benchmarks.real_configs import AR_CONFIG
from glm_jax.models import ar as ar_module
from glm_jax.models.ar import ArConfig, GlmImageAR
from glm_jax.sampling.ar_sampler import SamplingParams, processed_logprobs, slot_valid_mask


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def build(impl):
    conf = AR_CONFIG
    if SMOKE:
        from glm_jax.tiny import tiny_ar_config
        conf = tiny_ar_config()
    cfg = ArConfig.from_hf(conf)

    return cfg, random_module(lambda: GlmImageAR(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                                                 rngs=nnx.Rngs(0), implementation=impl, with_vision=False))


def jax_op_decode_attention(q_B1ND, k_BKSD, v_BKSD, mask_BS, scale, index):
    """The reference for the `jaxpallas` variant: JAX's own split-K decode kernel
    (`jax.experimental.pallas.ops.gpu.decode_attention`, deprecated in jax 0.11), one 128-slot split per program,
    as glm_jax used it before `glm_jax.models.decode_ops`."""
    from functools import partial

    from jax.experimental.pallas.ops.gpu import decode_attention as pda
    b, _, n, d = q_B1ND.shape
    kv = k_BKSD.shape[1]
    q_BKGD = q_B1ND.reshape(b, kv, n // kv, d)
    start_BK = jnp.broadcast_to(jnp.argmax(mask_BS, axis=-1).astype(jnp.int32)[:, None], (b, kv))
    len_BK = jnp.broadcast_to(jnp.asarray(index, jnp.int32) + 1, (b, kv))
    inner = partial(pda.decode_attn_unbatched, sm_scale=scale, block_h=max(16, n // kv), block_k=128,
                    k_splits=k_BKSD.shape[2] // 128, num_warps=None, num_stages=2, grid=None,
                    interpret=jax.default_backend() != "gpu", debug=False, return_residuals=False,
                    normalize_output=True)
    o_BKGD = jax.vmap(jax.vmap(inner))(q_BKGD, k_BKSD, v_BKSD, start_BK, len_BK)
    return o_BKGD.astype(q_B1ND.dtype).reshape(b, 1, n, d)


_OWN_KERNEL = ar_module.decode_attention_pallas


def set_variant(model, name: str, impl) -> None:
    ar_module.decode_attention_pallas = jax_op_decode_attention if "jaxpallas" in name else _OWN_KERNEL
    for layer in model.text.layers:
        a = layer.self_attn
        a.decode_attention = ("dpa" if name.startswith(("cudnn", "xla"))
                              else "pallas" if "pallas" in name else "einsum")
        a.implementation = {"cudnn": impl, "xla": "xla"}.get(name.split("+")[0], impl)
        a.fuse_qkv = "+fused" in name
    model.text.fuse_norms = "+plainnorm" not in name   # the layer-by-layer step: four norms and two adds per layer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tag", default="default")
    ap.add_argument("--variants", default="einsum,cudnn,einsum+fused,sample")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--profile", default="", help="variants to trace (64 steps) into $OUT/trace_<variant>_b<B>")
    ap.add_argument("--hlo", action="store_true", help="with --profile: also write each traced loop's optimised HLO "
                    "and its kernels in launch order ($OUT/ar_decode_probe_<tag>_<variant, + as ->_b<B>.{hlo.gz,ops.tsv}; "
                    "the XLA instructions are named with XLA_FLAGS=--xla_gpu_enable_command_buffer=)")
    args = ap.parse_args()
    res = {"device": device_info(), "xla_flags": os.environ.get("XLA_FLAGS", ""), "tag": args.tag}
    name = f"ar_decode_probe_{args.tag}"
    t0 = time.time()
    impl = "cudnn" if jax.default_backend() == "gpu" else None
    cfg, model = build(impl)
    res["build_s"] = time.time() - t0
    log(f"built in {res['build_s']:.1f}s")
    S, P = (160, 16) if SMOKE else (1408, 64)
    n1, n2 = (4, 20) if SMOKE else (32, 288)
    vocab = cfg.text.vision_vocab_size
    valid = slot_valid_mask(vocab, 16384 if not SMOKE else vocab - 2, cfg.text.eos_token_id % vocab)
    sp = SamplingParams(temperature=0.9, top_k=None, top_p=0.75)
    rng = np.random.default_rng(0)
    for variant in args.variants.split(","):
        base = variant
        set_variant(model, base, impl)
        graphdef, state = nnx.split(model)
        sample = variant.startswith("sample")
        fp32 = variant != "sample16"   # sample16: the head's bf16 logits into the processing (a 16-bit sort)

        @jax.jit
        def loop(state, ids, n_steps, key):
            m = nnx.merge(graphdef, state)
            b = ids.shape[0]
            pos = jnp.broadcast_to(jnp.arange(P)[None, None], (3, b, P))
            cache = m.init_cache(b, S)
            logits, cache = m.prefill(ids, pos, None, cache, fp32=fp32)

            def body(i, carry):
                logits, cache, acc = carry
                if sample:
                    lp = processed_logprobs(logits, valid, sp)
                    keys = jax.vmap(lambda j: jax.random.fold_in(jax.random.fold_in(key, j), i))(jnp.arange(b))
                    tok = jax.vmap(jax.random.categorical)(keys, lp).astype(jnp.int32)
                else:
                    tok = jnp.argmax(logits, -1).astype(jnp.int32)
                p = jnp.full((3, b), P + i, jnp.int32)
                logits, cache = m.decode(tok, p, cache, P + i, fp32=fp32)
                return logits, cache, acc + tok
            _, _, acc = jax.lax.fori_loop(0, n_steps, body, (logits, cache, jnp.zeros((b,), jnp.int32)))
            return acc

        for b in [int(x) for x in args.batches.split(",")]:
            ids = jnp.asarray(rng.integers(0, vocab, (b, P)))
            key = jax.random.key(0)
            try:
                t0 = time.time()
                jax_sync(loop(state, ids, n1, key))
                compile_s = time.time() - t0
                t1 = timeit(lambda: loop(state, ids, n1, key), sync=jax_sync, warmup=1, iters=3)["median_s"]
                t2 = timeit(lambda: loop(state, ids, n2, key), sync=jax_sync, warmup=1, iters=3)["median_s"]
                sps = (n2 - n1) / (t2 - t1)
                res[f"{variant}_b{b}"] = {"steps_per_s": sps, "step_ms": 1e3 / sps, "compile_s": compile_s}
                log(f"{args.tag} {variant} b{b}: {sps:.1f} steps/s ({1e3 / sps:.2f} ms), compile {compile_s:.0f}s")
                if variant in args.profile.split(","):
                    from benchmarks.trace_summary import summarise, timeline
                    tdir = os.path.join(os.environ.get("OUT", "out"), f"trace_{variant}_b{b}")
                    with jax.profiler.trace(tdir, create_perfetto_trace=True):
                        jax_sync(loop(state, ids, 64, key))
                    res[f"{variant}_b{b}"]["profile"] = summarise(tdir, top=30, steps=64)
                    if args.hlo:
                        import gzip

                        from benchmarks.trace_summary import op_sequence
                        stem = os.path.join(os.environ.get("OUT", "out"), f"{name}_{variant.replace('+', '-')}_b{b}")
                        with gzip.open(stem + ".hlo.gz", "wt") as f:
                            f.write(loop.lower(state, ids, n1, key).compile().as_text())
                        with open(stem + ".ops.tsv", "w") as f:
                            f.writelines(f"{op}\t{k}\t{d:.1f}\n" for op, k, d in op_sequence(tdir))
                    tl = res[f"{variant}_b{b}"]["timeline"] = timeline(tdir)
                    if tl:
                        log(f"{variant} b{b} trace, 64 steps: kernels span {tl['span_us'] / 64:.0f} us per step, busy "
                            f"{tl['busy_us'] / 64:.0f} us, {res[f'{variant}_b{b}']['profile']['kernels_per_step']:.0f} "
                            f"kernels per step, idle {tl['idle_us'] / 64:.0f} us in {tl['gaps'] / 64:.0f} gaps")
            except Exception as e:  # keep the other variants
                res[f"{variant}_b{b}_error"] = repr(e)[:400]
                log(f"{variant} b{b} failed: {e!r}"[:400])
            write_result(name, res)
        jax.clear_caches()


if __name__ == "__main__":
    main()
