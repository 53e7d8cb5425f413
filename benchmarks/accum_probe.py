"""Gradient accumulation into float32 accumulators: does XLA fold the add into the weight-gradient GEMM?

One DiT-sized weight gradient (`x^T dy`, x `[4352, 4096]`, dy `[4352, 16384]`, bf16) accumulated over 4
micro-batches in a `lax.scan`, as `train_step._accumulate` does, in two forms:

* `bf16_then_add`: the matmul writes bf16 and a separate pass adds it into the float32 accumulator (autodiff's form
  today: `acc + g.astype(float32)`);
* `f32_gemm_add`: the matmul writes float32 (`preferred_element_type`) and the add follows it directly, which
  XLA's GEMM rewriter can take as the GEMM's C operand (`"beta":1` in the optimised HLO).

    python -m benchmarks.accum_probe      # writes $OUT/accum_probe.json
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax
import jax.numpy as jnp

from benchmarks.common import SMOKE, device_info, jax_sync, timeit, write_result

T, D, F, M = (64, 32, 128, 4) if SMOKE else (4352, 4096, 16384, 4)


def bf16_then_add(acc, xs):
    x, dy = xs
    g = jnp.dot(x.T, dy)                                   # bf16 out
    return acc + g.astype(jnp.float32), None


def f32_gemm_add(acc, xs):
    x, dy = xs
    return acc + jnp.dot(x.T, dy, preferred_element_type=jnp.float32), None


def main():
    key = jax.random.key(0)
    kx, kd = jax.random.split(key)
    x = jax.random.normal(kx, (M, T, D), jnp.bfloat16)
    dy = jax.random.normal(kd, (M, T, F), jnp.bfloat16)
    res = {"device": device_info(), "shape": {"T": T, "D": D, "F": F, "micro_batches": M}}
    for name, body in (("bf16_then_add", bf16_then_add), ("f32_gemm_add", f32_gemm_add)):
        fn = jax.jit(lambda x, dy, body=body: jax.lax.scan(body, jnp.zeros((D, F), jnp.float32), (x, dy))[0])
        compiled = fn.lower(x, dy).compile()
        hlo = compiled.as_text()
        t = timeit(lambda: compiled(x, dy), sync=jax_sync, warmup=1, iters=20)
        out = compiled(x, dy)
        res[name] = {"median_s": t["median_s"], "min_s": t["min_s"], "beta1": hlo.count('"beta":1'),
                     "fusions": hlo.count("fusion("), "checksum": float(jnp.sum(out[:8, :8]))}
        print(name, json.dumps(res[name]), flush=True)
    flop = 2 * M * T * D * F
    for name in ("bf16_then_add", "f32_gemm_add"):
        res[name]["tflops"] = flop / res[name]["median_s"] / 1e12
    write_result("accum_probe", res)


if __name__ == "__main__":
    main()
