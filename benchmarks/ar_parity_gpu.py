"""Real-size AR logits parity on the GPU, with an fp32 referee.

bf16 rounding through 40 random layers is large, so the bf16 JAX-vs-transformers error alone does not say whether
the port is faithful. This script measures, on the same random 10.1B model and two 64-token prompts:
  jax bf16 vs torch bf16, jax bf16 vs torch fp32, torch bf16 vs torch fp32, and jax fp32 vs torch fp32
(errors are max|Δ| / max|ref| over the last position and over all positions).

    python -m benchmarks.ar_parity_gpu        # writes $OUT/ar_parity_gpu.json
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import gc

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from benchmarks.ar_gpu import AR_CONFIG, ATTN, DEV, TEXT_LO, build_torch, log
from benchmarks.common import device_info, module_from_torch, write_result
from conversion.tables.ar import RULES
from glm_jax.models.ar import ArConfig, GlmImageAR


def err(a, b):
    return {"last": float(np.abs(a[:, -1] - b[:, -1]).max() / np.abs(b[:, -1]).max()),
            "all": float(np.abs(a - b).max() / np.abs(b).max()),
            "mean_abs_over_max": float(np.abs(a - b).mean() / np.abs(b).max())}


def main():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    res = {"device": device_info()}
    tm = build_torch()
    cfg = ArConfig.from_hf(AR_CONFIG)
    jm = module_from_torch(tm, RULES, lambda: GlmImageAR(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                                                          rngs=nnx.Rngs(0), implementation=ATTN))
    graphdef, state = nnx.split(jm)
    del jm
    ids = np.random.default_rng(0).integers(TEXT_LO, cfg.text.vocab_size, (2, 64))
    pos = jnp.broadcast_to(jnp.arange(64)[None, None], (3, 2, 64))

    def jax_logits(graphdef, state):
        return np.asarray(jax.jit(lambda s: nnx.merge(graphdef, s).forward(jnp.asarray(ids), pos))(state))

    j16 = jax_logits(graphdef, state)
    with torch.no_grad():
        t16 = tm(input_ids=torch.tensor(ids, device=DEV)).logits.float().cpu().numpy()
    log("bf16 logits done")
    tm.float()
    gc.collect()
    with torch.no_grad():
        t32 = tm(input_ids=torch.tensor(ids, device=DEV)).logits.float().cpu().numpy()
    log("fp32 torch logits done")
    tm = None
    gc.collect()
    if DEV == "cuda":
        torch.cuda.empty_cache()
    graphdef32, _ = nnx.split(nnx.eval_shape(lambda: GlmImageAR(cfg, dtype=jnp.float32, param_dtype=jnp.float32,
                                                                 rngs=nnx.Rngs(0), implementation="xla")))
    state32 = jax.tree.map(lambda x: x.astype(jnp.float32), state)
    state = None
    with jax.default_matmul_precision("highest"):
        j32 = jax_logits(graphdef32, state32)
    log("fp32 jax logits done")
    res["jax_bf16_vs_torch_bf16"] = err(j16, t16)
    res["jax_bf16_vs_torch_fp32"] = err(j16, t32)
    res["torch_bf16_vs_torch_fp32"] = err(t16, t32)
    res["jax_fp32_vs_torch_fp32"] = err(j32, t32)
    res["argmax_agree_bf16"] = float((j16.argmax(-1) == t16.argmax(-1)).mean())
    write_result("ar_parity_gpu", res)


if __name__ == "__main__":
    main()
