"""Which cuBLAS epilogues XLA fuses into the DiT's matmul shapes, with and without its Triton GEMM path.

    python -m benchmarks.xla_epilogue_probe

Three bf16 functions at the real sizes (4352 tokens, width 4096, FF 16384) are compiled once per set of XLA
options, and the optimised HLO is read (nothing is timed):
* `sum3`: `a Wq^T + b Wk^T + c Wv^T`, the q / k / v data gradients summed (a matmul can take the running sum
  as its `C` operand: `"beta":1` in its backend config);
* `gelu`, `bias_gelu`: `jax.nn.gelu(x W (+ b), approximate=True)`, the FF's first projection (cuBLASLt's
  `GELU` / `BIAS_GELU` epilogues).
Writes `$OUT/xla_epilogue_probe.json` (per option set and function: matmuls with beta 1, the epilogues in the
HLO, the loop / input fusions left).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp

from benchmarks.common import SMOKE, device_info, write_result

L, D, F = (64, 128, 256) if SMOKE else (4352, 4096, 16384)
OPTION_SETS = {
    "default": {},
    "no_triton_gemm": {"xla_gpu_enable_triton_gemm": False},
    "no_cublaslt": {"xla_gpu_enable_cublaslt": False},
    "no_triton_gemm_no_cublaslt": {"xla_gpu_enable_triton_gemm": False, "xla_gpu_enable_cublaslt": False},
}


def functions():
    k = jax.random.split(jax.random.key(0), 8)
    bf = jnp.bfloat16
    a, b, c = (jax.random.normal(k[i], (L, D), bf) for i in range(3))
    w1, w2, w3 = (jax.random.normal(k[3 + i], (D, D), bf) for i in range(3))
    wf, bias = jax.random.normal(k[6], (D, F), bf), jax.random.normal(k[7], (F,), bf)
    return {
        "sum3": (lambda a, b, c, w1, w2, w3: a @ w1.T + b @ w2.T + c @ w3.T, (a, b, c, w1, w2, w3)),
        "gelu": (lambda x, w: jax.nn.gelu(x @ w, approximate=True), (a, wf)),
        "bias_gelu": (lambda x, w, bias: jax.nn.gelu(x @ w + bias, approximate=True), (a, wf, bias)),
    }


def inspect(hlo: str) -> dict:
    return {"beta_1_matmuls": len(re.findall(r'"beta":1\b', hlo)),
            "epilogues": sorted(set(re.findall(r'"epilogue":"(\w+)"', hlo))),
            "loop_or_input_fusions": len(re.findall(r"kind=k(?:Loop|Input)", hlo))}


def main():
    res = {"device": device_info(), "shape": {"L": L, "D": D, "F": F}, "options": {}}
    fns = functions()
    for name, options in OPTION_SETS.items():
        res["options"][name] = {"xla_options": options}
        for fname, (fn, args) in fns.items():
            hlo = jax.jit(fn).lower(*args).compile(compiler_options=options or None).as_text()
            res["options"][name][fname] = r = inspect(hlo)
            print(f"{name:28s} {fname:10s} beta 1: {r['beta_1_matmuls']}  epilogues: {r['epilogues']}  "
                  f"fusions: {r['loop_or_input_fusions']}", flush=True)
    write_result("xla_epilogue_probe", res)


if __name__ == "__main__":
    main()
