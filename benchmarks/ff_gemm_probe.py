"""The FF's matmul + GELU kernels (`glm_jax.models.ff_gemm`) against XLA's matmul + the separate GELU kernels.

    python -m benchmarks.ff_gemm_probe [--m 4352 --d 4096 --f 16384] [--steps 3]

At the real DiT block shapes: agreement with a float32 reference and time of the forward (`u W1 + b1`, GELU)
and of the backward piece (`g W2^T`, times `gelu'(p)`, bias column sums), each as the fused kernel and as
cuBLAS + the Pallas (Triton) GELU kernels the DiT uses otherwise. Times are per call over 30 calls issued back
to back (the dispatch overlaps the previous call), median of 5 such runs. Writes `$OUT/ff_gemm_probe.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import device_info
from glm_jax.models import dit_ops, ff_gemm


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def per_call(fn, *args, calls=30, runs=5):
    jax.block_until_ready(fn(*args))
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        for _ in range(calls):
            r = fn(*args)
        jax.block_until_ready(r)
        out.append((time.perf_counter() - t0) / calls)
    return statistics.median(out)


def rel(x, ref):
    x, ref = np.asarray(jnp.asarray(x, jnp.float32)), np.asarray(ref, np.float32)
    return float(np.max(np.abs(x - ref)) / np.max(np.abs(ref)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", type=int, default=4352)
    ap.add_argument("--d", type=int, default=4096)
    ap.add_argument("--f", type=int, default=16384)
    a = ap.parse_args()
    m, d, f = a.m, a.d, a.f
    ks = jax.random.split(jax.random.key(0), 5)
    bf = jnp.bfloat16
    u = jax.random.normal(ks[0], (m, d), bf)
    w1 = (jax.random.normal(ks[1], (d, f), jnp.float32) / np.sqrt(d)).astype(bf)
    b1 = (0.1 * jax.random.normal(ks[2], (f,), jnp.float32)).astype(bf)
    g = jax.random.normal(ks[3], (m, d), bf)
    w2 = (jax.random.normal(ks[4], (f, d), jnp.float32) / np.sqrt(f)).astype(bf)
    res = {"device": device_info(), "shape": [m, d, f], "fwd": {}, "bwd": {}}
    fl = 2 * m * d * f

    # references in float32
    p_ref = jnp.dot(u.astype(jnp.float32), w1.astype(jnp.float32), precision="highest") + b1.astype(jnp.float32)
    a_ref = ff_gemm._gelu(p_ref)
    p_bf = p_ref.astype(bf)
    dact = jnp.dot(g.astype(jnp.float32), w2.astype(jnp.float32).T, precision="highest")
    dp_ref = dact * ff_gemm._gelu_grad(p_bf.astype(jnp.float32))
    db_ref = dp_ref.sum(0)

    # the path used without these kernels: cuBLAS matmul + the Triton GELU kernels
    base_fwd = jax.jit(lambda u, w1, b1: dit_ops.gelu_kernel((u @ w1)[None], b1)[0])
    base_bwd = jax.jit(lambda g, w2, h, b1: dit_ops.gelu_backward_kernel(
        h[None], b1, jax.lax.dot_general(g, w2, (((1,), (1,)), ((), ())))[None]))
    zero_b = jnp.zeros_like(b1)
    t = per_call(base_fwd, u, w1, b1)
    res["fwd"]["cublas_plus_gelu_us"] = t * 1e6
    log(f"fwd  cuBLAS + GELU kernel: {t*1e6:.1f} us")
    t = per_call(jax.jit(lambda u, w1: u @ w1), u, w1)
    res["fwd"]["cublas_only_us"] = t * 1e6
    log(f"fwd  cuBLAS alone: {t*1e6:.1f} us ({fl/t/1e12:.0f} TF/s)")
    t = per_call(base_bwd, g, w2, p_bf, zero_b)
    res["bwd"]["cublas_plus_gelu_us"] = t * 1e6
    log(f"bwd  cuBLAS + GELU backward kernel: {t*1e6:.1f} us")
    t = per_call(jax.jit(lambda g, w2: jax.lax.dot_general(g, w2, (((1,), (1,)), ((), ())))), g, w2)
    res["bwd"]["cublas_only_us"] = t * 1e6
    log(f"bwd  cuBLAS alone: {t*1e6:.1f} us ({fl/t/1e12:.0f} TF/s)")

    variants = [dict(cwg=2, per_sm=1, steps=3), dict(cwg=1, per_sm=2, steps=2), dict(cwg=1, per_sm=2, steps=3),
                dict(cwg=1, per_sm=1, steps=4)]
    for v in variants:
        name = "cwg{cwg}_sm{per_sm}_s{steps}".format(**v)
        for b_t, (x, y) in ((False, (u, w1)), (True, (g, w2))):
            side = "bwd" if b_t else "fwd"
            try:
                mm = jax.jit(lambda x, y, b_t=b_t, v=v: ff_gemm.gemm(x, y, b_t=b_t, **v))
                err = rel(mm(x, y), dact if b_t else p_ref - b1.astype(jnp.float32))
                t = per_call(mm, x, y)
                res[side][f"matmul_{name}"] = {"us": t * 1e6, "err": err}
                log(f"{side}  {name} Mosaic matmul alone: {t*1e6:.1f} us ({fl/t/1e12:.0f} TF/s), error {err:.1e}")
            except Exception as e:  # a sweep: report and go on
                log(f"{side}  {name} matmul failed: {type(e).__name__}: {str(e)[:600]}")
        try:
            fwd = jax.jit(lambda u, w1, b1, v=v: ff_gemm.gemm_bias_gelu(u, w1, b1, approx=True, **v))
            p, act = fwd(u, w1, b1)
            errs = {"p": rel(p, p_ref), "a": rel(act, a_ref)}
            t = per_call(fwd, u, w1, b1)
            res["fwd"][f"fused_{name}"] = {"us": t * 1e6, **errs}
            log(f"fwd  {name} fused: {t*1e6:.1f} us, errors {errs}")
        except Exception as e:  # a sweep: report and go on
            log(f"fwd  {name} fused failed: {type(e).__name__}: {str(e)[:600]}")
        try:
            bwd = jax.jit(lambda g, w2, p, v=v: ff_gemm.gemm_gelu_grad(g, w2, p, approx=True, **v))
            dp, db = bwd(g, w2, p_bf)
            errs = {"dp": rel(dp, dp_ref), "db": rel(db, db_ref),
                    "db_vs_own_dp": rel(db, jnp.asarray(dp, jnp.float32).sum(0))}
            t = per_call(bwd, g, w2, p_bf)
            res["bwd"][f"fused_{name}"] = {"us": t * 1e6, **errs}
            log(f"bwd  {name} fused: {t*1e6:.1f} us, errors {errs}")
        except Exception as e:  # a sweep: report and go on
            log(f"bwd  {name} fused failed: {type(e).__name__}: {str(e)[:600]}")
    with open(os.path.join(os.environ.get("OUT", "."), "ff_gemm_probe.json"), "w") as fh:
        json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main()
