"""Real-size GLM-Image AR (10.1B, random bf16 weights) on one GPU: parity and speed against transformers.

A `GlmImageForConditionalGeneration` is created on the GPU in bf16 with random weights, converted in place to
`glm_jax.models.ar.GlmImageAR` through the key table (DLPack, no host copy), then:
  * last-position logits of a 64-token prompt: relative error max|Δ| / max|ref| (target ≤ 2e-2);
  * prefill of 1024 tokens (batch 1): JAX jitted `prefill` vs transformers forward;
  * decode steps/s at batch 1 and 32 with a 1408-slot cache: a jitted loop of greedy decode steps vs transformers
    `generate` (static and dynamic cache), both measured as (t(N2) − t(N1)) / (N2 − N1) so prefill cancels.

    python -m benchmarks.ar_gpu            # writes $OUT/ar_gpu.json and prints it
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

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
    timeit,
    torch_device,
    torch_sync,
    write_result,
)
from benchmarks.real_configs import AR_CONFIG
from conversion.tables.ar import RULES
from glm_jax.models.ar import ArConfig, GlmImageAR

DEV = torch_device()
ATTN = "cudnn" if DEV == "cuda" else None
if SMOKE:
    from glm_jax.tiny import tiny_ar_config
    AR_CONFIG = dict(tiny_ar_config(), dtype="bfloat16")
TEXT_LO = AR_CONFIG["text_config"]["vision_vocab_size"]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def build_torch(config: dict | None = None):
    """transformers' AR with random bf16 weights on the benchmark device (`config`: default the real AR config)."""
    from transformers import GlmImageConfig, GlmImageForConditionalGeneration
    config = AR_CONFIG if config is None else config
    cfg = GlmImageConfig(**{k: v for k, v in config.items() if k not in ("model_type", "architectures")})
    torch.manual_seed(0)
    with torch.device(DEV):
        model = GlmImageForConditionalGeneration._from_config(cfg, torch_dtype=torch.bfloat16).eval()
    return model


def main():
    res = {"device": device_info()}
    t0 = time.time()
    tm = build_torch()
    res["torch_build_s"] = time.time() - t0
    log(f"torch model built in {res['torch_build_s']:.1f}s")
    cfg = ArConfig.from_hf(AR_CONFIG)
    t0 = time.time()
    jm = module_from_torch(tm, RULES, lambda: GlmImageAR(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                                                          rngs=nnx.Rngs(0), implementation=ATTN))
    res["convert_s"] = time.time() - t0
    log(f"converted in {res['convert_s']:.1f}s")
    graphdef, state = nnx.split(jm)
    v_text = cfg.text.vocab_size

    # -- parity: last-position logits of a 64-token prompt ------------------------------------------------
    rng = np.random.default_rng(0)
    ids = rng.integers(TEXT_LO, v_text, (1, 64))
    with torch.no_grad():
        ref = tm(input_ids=torch.tensor(ids, device=DEV)).logits[0, -1].float().cpu().numpy()
    pos = jnp.broadcast_to(jnp.arange(64)[None, None], (3, 1, 64))

    @jax.jit
    def fwd(state, ids, pos):
        return nnx.merge(graphdef, state).forward(ids, pos)[:, -1]

    out = np.asarray(fwd(state, jnp.asarray(ids), pos))[0]
    res["logits_rel_err"] = float(np.abs(out - ref).max() / np.abs(ref).max())
    res["logits_argmax_equal"] = bool(out.argmax() == ref.argmax())
    log(f"parity {res['logits_rel_err']:.2e}")

    # -- prefill 1024 tokens ------------------------------------------------------------------------------
    L = 64 if SMOKE else 1024
    ids = jnp.asarray(rng.integers(TEXT_LO, v_text, (1, L)))
    pos = jnp.broadcast_to(jnp.arange(L)[None, None], (3, 1, L))

    @jax.jit
    def prefill(state, ids, pos):
        m = nnx.merge(graphdef, state)
        cache = m.init_cache(ids.shape[0], L + 8)
        return m.prefill(ids, pos, None, cache)

    res["jax_prefill_1024"] = timeit(lambda: prefill(state, ids, pos), sync=jax_sync)
    tids = torch.tensor(np.asarray(ids), device=DEV)
    with torch.no_grad():
        res["torch_prefill_1024"] = timeit(lambda: tm(input_ids=tids, logits_to_keep=1).logits, sync=torch_sync)
    log(f"prefill jax {res['jax_prefill_1024']['median_s']:.4f}s torch {res['torch_prefill_1024']['median_s']:.4f}s")
    write_result("ar_gpu", res)

    # -- decode ---------------------------------------------------------------------------------------------
    S, P = (160, 16) if SMOKE else (1408, 64)

    @jax.jit
    def decode_loop(state, ids, n_steps):
        m = nnx.merge(graphdef, state)
        b = ids.shape[0]
        pos = jnp.broadcast_to(jnp.arange(P)[None, None], (3, b, P))
        cache = m.init_cache(b, S)
        logits, cache = m.prefill(ids, pos, None, cache)

        def body(i, carry):
            logits, cache, acc = carry
            tok = jnp.argmax(logits, -1).astype(jnp.int32)
            p = jnp.full((3, b), P + i, jnp.int32)
            logits, cache = m.decode(tok, p, cache, P + i)
            return logits, cache, acc + tok
        _, _, acc = jax.lax.fori_loop(0, n_steps, body, (logits, cache, jnp.zeros((b,), jnp.int32)))
        return acc

    n1, n2 = (8, 40) if SMOKE else (32, 288)
    for b in (1, 8, 32):
        ids = jnp.asarray(rng.integers(TEXT_LO, v_text, (b, P)))
        t1 = timeit(lambda: decode_loop(state, ids, n1), sync=jax_sync, warmup=1, iters=3)["median_s"]
        t2 = timeit(lambda: decode_loop(state, ids, n2), sync=jax_sync, warmup=1, iters=3)["median_s"]
        res[f"jax_decode_b{b}_steps_per_s"] = (n2 - n1) / (t2 - t1)
        res[f"jax_decode_b{b}_step_ms"] = 1e3 * (t2 - t1) / (n2 - n1)
        write_result("ar_gpu", res)
        log(f"jax decode b{b}: {res[f'jax_decode_b{b}_steps_per_s']:.1f} steps/s")

    # transformers generate is slow (5-75 steps/s), so it gets fewer tokens; prefill cancels in the difference
    n1, n2 = (8, 24) if SMOKE else (8, 40)
    for impl in ("static", "dynamic"):
        for b in (1, 8, 32):
            write_result("ar_gpu", res)
            tids = torch.tensor(rng.integers(TEXT_LO, v_text, (b, P)), device=DEV)
            kw = dict(do_sample=False, pad_token_id=AR_CONFIG['image_end_token_id'], eos_token_id=None)
            if impl == "static":
                kw["cache_implementation"] = "static"

            def gen(n):
                with torch.no_grad():
                    return tm.generate(input_ids=tids, attention_mask=torch.ones_like(tids), max_new_tokens=n,
                                       min_new_tokens=n, **kw)
            try:
                t1 = timeit(lambda: gen(n1), sync=torch_sync, warmup=1, iters=1)["median_s"]
                t2 = timeit(lambda: gen(n2), sync=torch_sync, warmup=0, iters=1)["median_s"]
                res[f"torch_{impl}_decode_b{b}_steps_per_s"] = (n2 - n1) / (t2 - t1)
                log(f"torch {impl} b{b}: {res[f'torch_{impl}_decode_b{b}_steps_per_s']:.1f} steps/s")
            except Exception as e:  # report, keep the rest of the run
                res[f"torch_{impl}_decode_b{b}_error"] = repr(e)[:300]
    write_result("ar_gpu", res)


if __name__ == "__main__":
    main()
