"""A Mosaic GPU matmul (`benchmarks/mosaic_gemm.py`) against XLA's cuBLAS call for every matmul of the DiT
block's training step, in the operand layouts the step uses. Isolated timings: inside the step the kernel did
not beat cuBLAS where it does here (RESULTS.md).

    python -m benchmarks.mgpu_matmul_probe [--widths 4,8] [--roles fwd,dgrad,wgrad]

Roles at 1024² (4352 tokens, d 4096, FF 16384): forward `x W` (W stored `[in, out]`), data gradient
`dy W^T`, weight gradient `x^T dy`. Times are per call over 30 calls issued back to back, median of 5 runs;
the error is the largest difference to cuBLAS's result relative to its largest value. Writes
`$OUT/mgpu_matmul_probe.json`.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import back_to_back, device_info, write_result
from benchmarks.mosaic_gemm import gemm, supported

T, D, F = 4352, 4096, 16384


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def cases():
    """(role, a shape, b shape, a_t, b_t): the operands as stored in the step."""
    for k_in, n_out in ((D, F), (F, D), (D, D)):
        yield "fwd", (T, k_in), (k_in, n_out), False, False
        yield "dgrad", (T, n_out), (k_in, n_out), False, True
        yield "wgrad", (T, k_in), (T, n_out), True, False


def xla(a, b, a_t, b_t):
    return jax.lax.dot_general(a, b, (((0 if a_t else 1,), (1 if b_t else 0,)), ((), ())))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--widths", default="4,8")
    ap.add_argument("--roles", default="fwd,dgrad,wgrad")
    args = ap.parse_args()
    roles = args.roles.split(",")
    res = {"device": device_info(), "cases": {}}
    for i, (role, sa, sb, a_t, b_t) in enumerate(cases()):
        if role not in roles:
            continue
        ka, kb = jax.random.split(jax.random.key(i))
        a = jax.random.normal(ka, sa, jnp.bfloat16)
        b = jax.random.normal(kb, sb, jnp.bfloat16)
        ref_fn = jax.jit(lambda a, b, a_t=a_t, b_t=b_t: xla(a, b, a_t, b_t))
        ref = ref_fn(a, b)
        m, n = ref.shape
        k = sa[0] if a_t else sa[1]
        key = f"{role}_{m}x{n}x{k}"
        flop = 2 * m * n * k
        t_ref = back_to_back(ref_fn, a, b)
        row = {"cublas_us": t_ref * 1e6, "cublas_tflops": flop / t_ref / 1e12}
        log(f"{key}: cuBLAS {t_ref*1e6:.1f} us ({flop/t_ref/1e12:.0f} TF/s)")
        if not supported(m, n, k, a.dtype):
            log(f"  {key}: not tiled by the Mosaic kernel")
            res["cases"][key] = row
            continue
        refn = np.asarray(ref, np.float32)
        for w in [int(x) for x in args.widths.split(",")]:
            try:
                fn = jax.jit(lambda a, b, a_t=a_t, b_t=b_t, w=w: gemm(a, b, a_t=a_t, b_t=b_t, width=w))
                out = np.asarray(fn(a, b), np.float32)
                err = float(np.max(np.abs(out - refn)) / np.max(np.abs(refn)))
                t = back_to_back(fn, a, b)
            except Exception as e:  # a sweep: report and go on
                log(f"  width {w} failed: {type(e).__name__}: {str(e)[:800]}")
                continue
            row[f"mosaic_w{w}_us"] = t * 1e6
            row[f"mosaic_w{w}_err"] = err
            log(f"  Mosaic width {w}: {t*1e6:.1f} us ({flop/t/1e12:.0f} TF/s, {100*(t/t_ref-1):+.1f}%), error {err:.1e}")
        res["cases"][key] = row
    write_result("mgpu_matmul_probe", res)


if __name__ == "__main__":
    main()
