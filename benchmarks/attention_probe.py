"""The DiT's attention alone at 1024² (4352 tokens, 32 heads x 128, bf16, batch 1): cuDNN flash attention
(`jax.nn.dot_product_attention(implementation="cudnn")`, what the model uses) against JAX's experimental Mosaic GPU
kernel (`jax.experimental.pallas.ops.gpu.attention_mgpu`, in float16) with a few tilings, forward and forward + backward.

    python -m benchmarks.attention_probe [--padding N | --layouts | --torch]

Outputs and gradients of each variant are compared with cuDNN's. Writes `$OUT/attention_probe.json`.
`--padding N` times cuDNN alone with the last N keys masked out (`key_value_seq_lengths`, as the DiT does for a
stream padded to a multiple of 8 rows), and with the queries' lengths given too, against no mask
(`$OUT/attention_probe_padding.json`; the masked calls differ from the unmasked one by design).
"""

from __future__ import annotations

import os
from functools import partial

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax
import jax.numpy as jnp

from benchmarks.common import back_to_back, device_info, jax_sync, timeit, write_result

B, L, H, D = 1, 4352, 32, 128


def _mgpu(M, cfg, q, k, v):
    """The Mosaic GPU kernel takes float16 (bf16 fails in its backward on jax 0.11.2): cast in and out."""
    h = lambda x: x.astype(jnp.float16)
    return M.attention(h(q * jnp.asarray(D ** -0.5, q.dtype)), h(k), h(v), cfg).astype(q.dtype)


def main():
    import argparse
    ap = argparse.ArgumentParser()
    ap.add_argument("--padding", type=int, default=0)
    ap.add_argument("--layouts", action="store_true", help="cuDNN on [B, T, N, H] inputs (the model's) against "
                    "[B, N, T, H] ones, each timed over 30 calls issued back to back")
    ap.add_argument("--torch", action="store_true", help="JAX's cuDNN attention against PyTorch's SDPA backends "
                    "(cuDNN, flash, memory-efficient) on the same card, 30 calls back to back each")
    a = ap.parse_args()
    if a.layouts:
        return layouts()
    if a.torch:
        return against_torch()
    res = {"device": device_info(), "shape": [B, L, H, D]}
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v, cot = (jax.random.normal(kk, (B, L, H, D), jnp.bfloat16) for kk in keys)
    fwd_flop = 4 * B * L * L * H * D

    cudnn = partial(jax.nn.dot_product_attention, scale=D ** -0.5, implementation="cudnn")

    def variants():
        if a.padding:
            n = jnp.full((B,), L - a.padding, jnp.int32)
            yield "cudnn", cudnn
            yield "cudnn_kv_lengths", partial(cudnn, key_value_seq_lengths=n)
            yield "cudnn_q_kv_lengths", partial(cudnn, query_seq_lengths=n, key_value_seq_lengths=n)
            yield "cudnn_again", cudnn
            return
        yield "cudnn", cudnn
        from jax.experimental.pallas.ops.gpu import attention_mgpu as M
        for bkv in (128, 64):
            for bwd in ((64, 64, 64, 64), (64, 128, 128, 64)):
                for wgs in (1, 2):
                    cfg = M.TuningConfig(block_q=64, block_kv=bkv, max_concurrent_steps=2, compute_wgs_bwd=wgs,
                                         block_q_dkv=bwd[0], block_kv_dkv=bwd[1], block_q_dq=bwd[2],
                                         block_kv_dq=bwd[3])
                    yield (f"mgpu_kv{bkv}_bwd{'-'.join(map(str, bwd))}_wg{wgs}",
                           lambda q, k, v, cfg=cfg: _mgpu(M, cfg, q, k, v))

    ref_out = ref_grads = None
    for name, fn in variants():
        try:
            f = jax.jit(fn)
            g = jax.jit(jax.grad(lambda q, k, v, fn=fn: jnp.vdot(fn(q, k, v).astype(jnp.float32),
                                                                  cot.astype(jnp.float32)), argnums=(0, 1, 2)))
            out, grads = f(q, k, v), g(q, k, v)
            tf = timeit(lambda: f(q, k, v), sync=jax_sync, iters=10)["median_s"]
            tg = timeit(lambda: g(q, k, v), sync=jax_sync, iters=10)["median_s"]
            r = {"fwd_ms": tf * 1e3, "fwd_bwd_ms": tg * 1e3, "fwd_tflops": fwd_flop / tf / 1e12,
                 "bwd_tflops_2p5x": 2.5 * fwd_flop / (tg - tf) / 1e12}
            if ref_out is None:
                ref_out, ref_grads = out, grads
            else:
                err = lambda a, b: float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))) /
                                         jnp.max(jnp.abs(b.astype(jnp.float32))))
                r["out_err"] = err(out, ref_out)
                r["grad_err"] = max(err(a, b) for a, b in zip(grads, ref_grads))
            res[name] = r
            print(name, {k: round(x, 4) for k, x in r.items()}, flush=True)
        except Exception as e:  # keep the other variants
            res[name] = {"error": repr(e)[:300]}
            print(name, "failed:", repr(e)[:300], flush=True)
    write_result("attention_probe_padding" if a.padding else "attention_probe", res)


def layouts():
    """cuDNN's attention with the heads axis before or after the tokens axis (the inputs already laid out so), time
    per call over 30 calls issued back to back (median of 5), forward and forward + backward."""
    from jax._src.cudnn.fused_attention_stablehlo import dot_product_attention as cudnn_attention
    res = {"device": device_info(), "shape": [B, L, H, D]}
    keys = jax.random.split(jax.random.key(0), 4)
    btnh = [jax.random.normal(kk, (B, L, H, D), jnp.bfloat16) for kk in keys]
    bnth = [jnp.swapaxes(x, 1, 2) for x in btnh]

    outs = {}
    for name, layout, (q, k, v, cot) in (("BTNH", "BTNH", btnh), ("BNTH", "BNTH", bnth), ("BTNH_again", "BTNH", btnh)):
        fn = partial(cudnn_attention, scale=D ** -0.5, qkv_layout=layout)
        f = jax.jit(fn)
        g = jax.jit(jax.grad(lambda q, k, v, fn=fn, cot=cot: jnp.vdot(fn(q, k, v).astype(jnp.float32),
                                                                       cot.astype(jnp.float32)), argnums=(0, 1, 2)))
        tf, tg = back_to_back(f, q, k, v), back_to_back(g, q, k, v)
        out = f(q, k, v)
        outs[name] = out if layout == "BTNH" else jnp.swapaxes(out, 1, 2)
        res[name] = {"fwd_ms": tf * 1e3, "fwd_bwd_ms": tg * 1e3}
        print(name, res[name], flush=True)
    res["max_out_diff"] = float(jnp.max(jnp.abs(outs["BNTH"].astype(jnp.float32) - outs["BTNH"].astype(jnp.float32))))
    write_result("attention_probe_layouts", res)


def _cudnn_versions() -> dict:
    """The cuDNN library JAX loaded, and the cuDNN pip packages of the environment."""
    out = {}
    try:
        from jax._src.lib import cuda_versions
        out["jax_cudnn"] = cuda_versions.cudnn_get_version()
    except Exception as e:  # a CPU-only jaxlib has no cuda_versions
        out["jax_cudnn"] = repr(e)[:100]
    from importlib import metadata
    out["pip"] = sorted(f"{d.metadata['Name']} {d.version}" for d in metadata.distributions()
                        if "cudnn" in (d.metadata["Name"] or "").lower())
    return out


def against_torch():
    """Forward and forward + backward of the same attention in JAX (cuDNN, what the model runs) and in PyTorch's
    `scaled_dot_product_attention` with each backend it has, 30 calls back to back (median of 5 runs)."""
    import statistics
    import time

    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    res = {"device": device_info(), "shape": [B, L, H, D], "cudnn": _cudnn_versions()}
    fwd_flop = 4 * B * L * L * H * D
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v, cot = (jax.random.normal(kk, (B, L, H, D), jnp.bfloat16) for kk in keys)
    fn = partial(jax.nn.dot_product_attention, scale=D ** -0.5, implementation="cudnn")
    f = jax.jit(fn)
    g = jax.jit(jax.grad(lambda q, k, v: jnp.vdot(fn(q, k, v).astype(jnp.float32), cot.astype(jnp.float32)),
                         argnums=(0, 1, 2)))

    def row(tf, tg):
        return {"fwd_ms": tf * 1e3, "fwd_bwd_ms": tg * 1e3, "bwd_ms": (tg - tf) * 1e3,
                "fwd_tflops": fwd_flop / tf / 1e12, "bwd_tflops_2p5x": 2.5 * fwd_flop / (tg - tf) / 1e12}

    res["jax_cudnn"] = row(back_to_back(f, q, k, v), back_to_back(g, q, k, v))
    print("jax_cudnn", {n: round(x, 3) for n, x in res["jax_cudnn"].items()}, flush=True)
    to_t = lambda x: torch.from_dlpack(jnp.swapaxes(x, 1, 2).copy()).requires_grad_(True)   # [B, N, T, H]
    tq, tk, tv, tcot = (to_t(x) for x in (q, k, v, cot))

    def t_back_to_back(fn, calls=30, runs=5):
        fn()
        torch.cuda.synchronize()
        per = []
        for _ in range(runs):
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            torch.cuda.synchronize()
            per.append((time.perf_counter() - t0) / calls)
        return statistics.median(per)

    for name, backend in (("torch_cudnn", SDPBackend.CUDNN_ATTENTION), ("torch_flash", SDPBackend.FLASH_ATTENTION),
                          ("torch_efficient", SDPBackend.EFFICIENT_ATTENTION), ("jax_cudnn_again", None)):
        if backend is None:
            res[name] = row(back_to_back(f, q, k, v), back_to_back(g, q, k, v))
            print(name, {n: round(x, 3) for n, x in res[name].items()}, flush=True)
            continue
        try:
            with sdpa_kernel(backend):
                def tf():
                    with torch.no_grad():
                        return F.scaled_dot_product_attention(tq, tk, tv)

                def tg():
                    tq.grad = tk.grad = tv.grad = None
                    F.scaled_dot_product_attention(tq, tk, tv).backward(tcot)
                res[name] = row(t_back_to_back(tf), t_back_to_back(tg))
                with torch.no_grad():
                    out = F.scaled_dot_product_attention(tq, tk, tv)
                ref = jnp.swapaxes(f(q, k, v), 1, 2).astype(jnp.float32)
                res[name]["max_out_diff_vs_jax"] = float(jnp.max(jnp.abs(jnp.asarray(out.float().cpu().numpy()) -
                                                                         ref)))
            print(name, {n: round(x, 3) for n, x in res[name].items()}, flush=True)
        except Exception as e:  # a backend this build or card lacks
            res[name] = {"error": repr(e)[:300]}
            print(name, "failed:", repr(e)[:300], flush=True)
    res["torch_cudnn_version"] = torch.backends.cudnn.version()
    write_result("attention_probe_torch", res)


if __name__ == "__main__":
    main()
