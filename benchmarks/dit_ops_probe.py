"""The DiT ops' Pallas kernels (`glm_jax.models.dit_ops`) at the real 1024² shapes: agreement with the plain-JAX
path and time per kernel for a sweep of tilings (launch order, warps, rows and columns per program).

    python -m benchmarks.dit_ops_probe [--iters 20] [--quick] [--no-check]

Tilings are set through the environment variables the kernels read at trace time (`GLM_JAX_K_ORDER`,
`GLM_JAX_K_WARPS`, `GLM_JAX_K_ROWS`, `GLM_JAX_K_BC`). Bandwidth = bytes read + written / time (HBM3 peak
3.35 TB/s). Writes `$OUT/dit_ops_probe.json`.
"""

from __future__ import annotations

import argparse
import itertools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import SMOKE, device_info, write_result
from glm_jax.models import dit_ops

B, L, D, F, K, T = (1, 128, 512, 512, 64, 40) if SMOKE else (1, 4352, 4096, 16384, 128, 256)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def arrays(dtype):
    r = np.random.default_rng(0)
    a = lambda *s, sc=1.0: jnp.asarray(r.standard_normal(s) * sc, jnp.float32)
    c = lambda x: x.astype(dtype)
    ang = a(L, K // 2, sc=2.0)
    ang = jnp.concatenate([ang, ang], -1)
    return dict(x=c(a(B, L, D) + 0.5), g=c(a(B, L, D)), f=c(a(B, L, D)), du=c(a(B, L, D)), gate=a(B, 2, D),
                shift=a(B, 2, D, sc=0.3), scale=a(B, 2, D, sc=0.3), bias=c(a(D)), cos=jnp.cos(ang),
                sin=jnp.sin(ang), h=c(a(B, L, F, sc=2.0)), gh=c(a(B, L, F)), bias_f=c(a(F)))


def kernels(v):
    """name -> (kernel as a function of the array it is chained through, that array, bytes moved per call)."""
    n = B * L * D * v["x"].dtype.itemsize
    nf = B * L * F * v["h"].dtype.itemsize
    sp = 1 + v["scale"]
    stats = jnp.ones((B, L, 4), jnp.float32)
    i = {"interpret": jax.default_backend() != "gpu"}   # BENCH_SMOKE on CPU: Pallas' interpreter
    return {
        "gate_bwd": (lambda g: dit_ops.gate_backward_kernel(g, v["f"], v["bias"], v["gate"], T, **i)[0], v["g"], 3 * n),
        "mod_bwd": (lambda du: dit_ops.modulate_backward_kernel(du, v["x"], v["g"], stats, sp, T, **i)[0], v["du"],
                    4 * n),
        "mod_fwd": (lambda x: dit_ops.modulate_kernel(x, v["shift"], v["scale"], T, **i)[0], v["x"], 2 * n),
        "rope_fwd": (lambda x: dit_ops.norm_rope_kernel(x, v["bias"], v["cos"], v["sin"], **i), v["x"], 2 * n),
        "rope_bwd": (lambda g: dit_ops.norm_rope_backward_kernel(v["x"], v["bias"], v["cos"], v["sin"], g, **i)[0],
                     v["g"], 3 * n),
        "gelu_fwd": (lambda h: dit_ops.gelu_kernel(h, v["bias_f"], **i), v["h"], 2 * nf),
        "gelu_bwd": (lambda g: dit_ops.gelu_backward_kernel(v["h"], v["bias_f"], g, **i)[0], v["gh"], 3 * nf),
    }


def time_fn(fn, x, iters):
    """Seconds per call of `fn`, from `iters` calls chained through `x` inside one executable (no dispatch
    overhead between them), minus nothing: the chain is the kernels alone."""
    def chain(x):
        for _ in range(iters):
            x = fn(x)
        return x
    f = jax.jit(chain)
    jax.block_until_ready(f(x))
    t0 = time.perf_counter()
    jax.block_until_ready(f(x))
    return (time.perf_counter() - t0) / iters


def agreement(dtype):
    """Max relative difference of every op's outputs and input gradients: the kernels on `dtype` inputs against
    the plain-JAX path in float32 on the same values (and the same cotangents, rounded to `dtype`)."""
    v = arrays(dtype)

    def run(v):
        def vjp(fn, *a):
            out, back = jax.vjp(fn, *a)
            return out, back(jax.tree.map(lambda o: jnp.asarray(np.random.default_rng(1).standard_normal(o.shape),
                                                                  dtype).astype(o.dtype), out))
        return jax.jit(lambda v: {
            "modulate_split": vjp(lambda x, s, sc: dit_ops.modulate_split(x, s, sc, T), v["x"], v["shift"], v["scale"]),
            "gated_residual": vjp(lambda x, f, b, gt: dit_ops.gated_residual(x, f, b, gt, T), v["x"], v["f"],
                                  v["bias"], v["gate"]),
            "qk_norm_rope": vjp(dit_ops.qk_norm_rope, v["g"], v["bias"], v["cos"], v["sin"]),
            "bias_gelu": vjp(dit_ops.bias_gelu, v["h"], v["bias_f"]),
        })(v)

    os.environ.pop("GLM_JAX_DIT_KERNELS", None)
    ker = run(v)
    os.environ["GLM_JAX_DIT_KERNELS"] = "0"
    ref = run(jax.tree.map(lambda a: a.astype(jnp.float32), v))
    os.environ.pop("GLM_JAX_DIT_KERNELS")
    res = {}
    for name in ker:
        errs = []
        for a, b in zip(jax.tree.leaves(ker[name]), jax.tree.leaves(ref[name])):
            a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
            errs.append(float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)))
        res[name] = errs
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="only the default tiling")
    ap.add_argument("--no-check", action="store_true", help="skip the agreement check")
    a = ap.parse_args()
    res = {"device": device_info(), "shape": dict(B=B, L=L, D=D, F=F, K=K, T=T), "agreement": {}, "sweep": []}
    if jax.default_backend() == "gpu" and not a.no_check:
        for dt in (jnp.float32, jnp.bfloat16):
            res["agreement"][jnp.dtype(dt).name] = agreement(dt)
            log(f"agreement {jnp.dtype(dt).name}: " + ", ".join(
                f"{k} {max(e):.1e}" for k, e in res["agreement"][jnp.dtype(dt).name].items()))
    grid = ([("cols", 4, 32, 128)] if a.quick else
            list(itertools.product(("cols",), (2, 4, 8), (32, 16, 8), (128, 256))))
    v = arrays(jnp.bfloat16)
    for order, warps, rows, bc in grid:
        os.environ.update(GLM_JAX_K_ORDER=order, GLM_JAX_K_WARPS=str(warps), GLM_JAX_K_ROWS=str(rows),
                          GLM_JAX_K_BC=str(bc), GLM_JAX_K_FROWS=str(rows // 2))
        row = {"order": order, "warps": warps, "rows": rows, "bc": bc}
        for name, (fn, x, nbytes) in kernels(v).items():
            if bc == 256 and name not in ("gate_bwd", "mod_bwd", "mod_fwd"):
                continue
            try:
                s = time_fn(fn, x, a.iters)
                row[name] = {"us": s * 1e6, "tb_s": nbytes / s / 1e12}
            except Exception as e:  # a tiling Triton rejects
                row[name] = {"error": str(e).splitlines()[0][:200]}
        res["sweep"].append(row)
        log(" ".join(f"{k}={v}" for k, v in row.items() if not isinstance(v, dict)) + " | " + " ".join(
            f"{k} {v['us']:.1f}us {v['tb_s']:.2f}TB/s" if "us" in v else f"{k} ERR" for k, v in row.items()
            if isinstance(v, dict)))
    for k in ("GLM_JAX_K_ORDER", "GLM_JAX_K_WARPS", "GLM_JAX_K_ROWS", "GLM_JAX_K_BC", "GLM_JAX_K_FROWS"):
        os.environ.pop(k, None)
    write_result("dit_ops_probe", res)


if __name__ == "__main__":
    main()
