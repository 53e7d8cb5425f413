"""The processed policy's kept set (top-k + top-p) at the size of one micro-batch of the AR update: the float32
logits cast to float32 sorted against the bf16 logits sorted (`kept_mask(sort_keys(...))`), kept sets compared.

    python -m benchmarks.topp_probe [--rows 10248] [--vocab 16512] [--codes 16384]

Rows = positions scored in one micro-batch (8 sequences x 1281 generated tokens), bf16 logits (ties between equal
values are common, as with the model's), invalid ids past the image codes. Writes `$OUT/topp_probe.json`.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import SMOKE, back_to_back, device_info, write_result
from glm_jax.sampling import ar_sampler as S


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=64 if SMOKE else 10248)
    ap.add_argument("--vocab", type=int, default=301 if SMOKE else 16512)
    ap.add_argument("--codes", type=int, default=280 if SMOKE else 16384)
    ap.add_argument("--scale", type=float, default=3.0, help="standard deviation of the random logits")
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.standard_normal((a.rows, a.vocab)) * a.scale, jnp.bfloat16)
    valid = jnp.arange(a.vocab) < a.codes
    res = {"device": device_info(), "rows": a.rows, "vocab": a.vocab, "codes": a.codes, "scale": a.scale}
    with_k, no_k = S.SamplingParams(top_k=a.codes), S.SamplingParams(top_k=None)
    sort = lambda p, lg: S.kept_mask(S.sort_keys(lg.astype(jnp.float32), valid), p)
    sort16 = lambda p, lg: S.kept_mask(S.sort_keys(lg, valid), p)
    impls = {"sort": (with_k, sort), "sort16": (with_k, sort16), "sort_no_k": (no_k, sort),
             "sort16_no_k": (no_k, sort16)}   # name: (params, kept set of (params, logits))
    fns = {}
    for name, (p, impl) in impls.items():
        @jax.jit
        def kept(lg, p=p, impl=impl):
            return impl(p, lg)

        @jax.jit
        def logprobs(lg, p=p, impl=impl):
            z = S.scaled_logits(lg, valid, p)
            return jax.nn.log_softmax(jnp.where(impl(p, lg), z, -jnp.inf), axis=-1)
        fns[name] = (kept, logprobs)
    masks = {n: np.asarray(f[0](logits)) for n, f in fns.items()}
    for ref, new in (("sort", "sort16"), ("sort_no_k", "sort16_no_k")):
        diff_rows = int(np.sum(np.any(masks[ref] != masks[new], axis=-1)))
        res[f"{new}_rows_differing"] = diff_rows
        res[f"{new}_kept_mean"] = float(masks[new].sum(-1).mean())
        log(f"{new} vs {ref}: {diff_rows} of {a.rows} rows differ; kept per row {masks[new].sum(-1).mean():.1f}")
    for name, (kept, logprobs) in fns.items():
        tk = back_to_back(kept, logits, calls=10, runs=3)
        tl = back_to_back(logprobs, logits, calls=10, runs=3)
        res[name] = {"kept_ms": tk * 1e3, "logprobs_ms": tl * 1e3}
        log(f"{name}: kept set {tk * 1e3:.2f} ms, processed log-probs {tl * 1e3:.2f} ms")
    small = logits[:32]   # one decode step of a 32-sequence rollout
    for name in ("sort", "sort16"):
        t = back_to_back(fns[name][0], small, calls=30, runs=3)
        res[f"{name}_32_rows_ms"] = t * 1e3
        log(f"{name}, 32 rows (a decode step): kept set {t * 1e3:.3f} ms")
    z32 = S.scaled_logits(logits, valid, with_k)
    parts = {
        "sort_f32": (jax.jit(lambda z: jnp.sort(z, axis=-1)), z32),
        "sort_bf16": (jax.jit(lambda x: jnp.sort(jnp.where(valid, x, -jnp.inf), axis=-1)), logits),
        "softmax_cumsum": (jax.jit(lambda z: jnp.cumsum(jax.nn.softmax(z, axis=-1), axis=-1)), z32),
        "cumsum_int": (jax.jit(lambda z: jnp.cumsum(z > 0, axis=-1, dtype=jnp.int32)), z32),
        "one_masked_sum": (jax.jit(lambda z: jnp.sum(jnp.where(z > 0.5, z, 0.0), axis=-1)), z32),
    }
    for name, (fn, x) in parts.items():
        t = back_to_back(fn, x, calls=10, runs=3)
        res[name + "_ms"] = t * 1e3
        log(f"{name}: {t * 1e3:.2f} ms")
    write_result("topp_probe", res)


if __name__ == "__main__":
    main()
