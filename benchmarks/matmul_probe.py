"""Throughput of every matmul shape of one real-size DiT block's forward + backward, JAX (XLA: cuBLAS or Triton,
autotuned) and PyTorch (cuBLAS) in the same process, to see which shapes run below the card's matmul rate.

    python -m benchmarks.matmul_probe [--tag default] [--reps 8] [--iters 20] [--no-torch]

Shapes at 1024² (T = 4096 image + 256 glyph tokens, D = 4096, FF = 16384): forward `x @ W`, data gradient
`dy @ W^T` and weight gradient `x^T @ dy` for the q / k / v / out projections (one `D x D` each, or q, k, v as one
`D x 3D` matmul) and the two FF matmuls. Each timing is one jitted call of `--reps` independent matmuls on
different inputs (so launches overlap and nothing is merged), median of `--iters` calls, divided by `--reps`.
Writes `$OUT/matmul_probe_<tag>.json`.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import SMOKE, device_info, write_result

T, D, F = (64, 128, 512) if SMOKE else (4352, 4096, 16384)

# name: (lhs shape, rhs shape, contracting dims (lhs, rhs))
CASES = {
    "proj_fwd": ((T, D), (D, D), (1, 0)),
    "qkv_fwd": ((T, D), (D, 3 * D), (1, 0)),
    "ff1_fwd": ((T, D), (D, F), (1, 0)),
    "ff2_fwd": ((T, F), (F, D), (1, 0)),
    "proj_dgrad": ((T, D), (D, D), (1, 1)),
    "qkv_dgrad": ((T, 3 * D), (D, 3 * D), (1, 1)),
    "ff1_dgrad": ((T, F), (D, F), (1, 1)),
    "ff2_dgrad": ((T, D), (F, D), (1, 1)),
    "proj_wgrad": ((T, D), (T, D), (0, 0)),
    "qkv_wgrad": ((T, D), (T, 3 * D), (0, 0)),
    "ff1_wgrad": ((T, D), (T, F), (0, 0)),
    "ff2_wgrad": ((T, F), (T, D), (0, 0)),
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def flops(lhs, rhs, dims) -> float:
    return 2.0 * np.prod(lhs) * rhs[1 - dims[1]]


def time_jax(lhs, rhs, dims, reps, iters) -> float:
    key = jax.random.PRNGKey(0)
    xs = [jax.random.normal(jax.random.fold_in(key, i), lhs, jnp.bfloat16) for i in range(reps)]
    w = jax.random.normal(jax.random.fold_in(key, 99), rhs, jnp.bfloat16)
    dn = (((dims[0],), (dims[1],)), ((), ()))
    f = jax.jit(lambda xs, w: [jax.lax.dot_general(x, w, dn, preferred_element_type=jnp.bfloat16) for x in xs])
    jax.block_until_ready(f(xs, w))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(f(xs, w))
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) / reps


def time_torch(lhs, rhs, dims, reps, iters) -> float:
    import torch
    g = torch.Generator(device="cuda").manual_seed(0)
    xs = [torch.randn(lhs, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(reps)]
    w = torch.randn(rhs, device="cuda", dtype=torch.bfloat16, generator=g)
    a = (lambda x: x) if dims[0] == 1 else (lambda x: x.t())
    b = (lambda m: m) if dims[1] == 0 else (lambda m: m.t())
    for x in xs:
        torch.matmul(a(x), b(w))
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for x in xs:
            torch.matmul(a(x), b(w))
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return float(np.median(times)) / reps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tag", default="default")
    ap.add_argument("--reps", type=int, default=8)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--no-torch", action="store_true")
    a = ap.parse_args()
    use_torch = not a.no_torch and jax.default_backend() == "gpu"
    res = {"device": device_info(), "xla_flags": os.environ.get("XLA_FLAGS", ""), "T": T, "D": D, "F": F,
           "cases": {}}
    for name, (lhs, rhs, dims) in CASES.items():
        r = {"gflop": flops(lhs, rhs, dims) / 1e9, "jax_ms": time_jax(lhs, rhs, dims, a.reps, a.iters) * 1e3}
        r["jax_tflops"] = r["gflop"] / r["jax_ms"]
        if use_torch:
            r["torch_ms"] = time_torch(lhs, rhs, dims, a.reps, a.iters) * 1e3
            r["torch_tflops"] = r["gflop"] / r["torch_ms"]
        res["cases"][name] = r
        log(f"{name:11s} {r['gflop']:7.1f} GFLOP  jax {r['jax_ms']:.3f} ms {r['jax_tflops']:4.0f} TFLOP/s"
            + (f"  torch {r['torch_ms']:.3f} ms {r['torch_tflops']:4.0f} TFLOP/s" if use_torch else ""))
    write_result(f"matmul_probe_{a.tag}", res)


if __name__ == "__main__":
    main()
