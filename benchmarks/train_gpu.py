"""Training-step speed at real width on one GPU (random bf16 weights), JAX and PyTorch in the same process.

    python -m benchmarks.train_gpu --part dit   # DiT 6.9B forward + backward at 1024², batch 1: remat none /
                                                # dots / full vs diffusers without and with gradient checkpointing
        [--policies none,dots,dots_attention]   # the remat policies timed (glm_jax.models.remat)
        [--iters 3] [--warm 0]                  # DiT steps timed per variant; seconds of steps before timing
    python -m benchmarks.train_gpu --part ar    # one AR GRPO update, 32 sequences x (64 prompt + 1281 generated)
                                                # tokens, real width, reduced depth (--layers, default 4)

MFU is model FLOPs / time / 989 TFLOP/s (H100 SXM dense bf16). DiT FLOPs: `glm_jax.models.dit.dit_flops`
(forward; forward + backward = 3x). AR FLOPs: 6 x (matmul parameters of the layers + lm_head) x tokens plus
attention (4 T² d per layer forward, x3).

The AR update in JAX is the whole `ar_update_step` (teacher-forced re-scoring with the processed top-p policy,
GRPO loss, gradient accumulation over micro-batches, global-norm clip, AdamW with fp32 moments on bf16 params).
The PyTorch side is the same model in transformers, each micro-batch's forward + backward of a plain
advantage-weighted log-softmax loss over the generated positions (no top-p processing: cheaper than GRPO), then
`torch.optim.AdamW` (foreach) on the bf16 parameters: a lower bound on what a PyTorch GRPO step costs.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse
import gc
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from benchmarks.common import (
    SMOKE,
    ar_flops,
    device_info,
    jax_sync,
    module_from_torch,
    timeit,
    torch_device,
    torch_sync,
)
from benchmarks.common import write_result as _write
from benchmarks.real_configs import AR_CONFIG, DIT_CONFIG

DEV = torch_device()
ATTN = "cudnn" if DEV == "cuda" else None
PEAK = 989e12
H = W = 256 if SMOKE else 1024
if SMOKE:
    from glm_jax.tiny import tiny_ar_config, tiny_dit_config
    AR_CONFIG, DIT_CONFIG = dict(tiny_ar_config(), dtype="bfloat16"), tiny_dit_config()


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def peak_gib() -> float:
    try:
        return jax.devices()[0].memory_stats().get("peak_bytes_in_use", 0) / 2 ** 30
    except Exception:
        return float("nan")


def run_dit(res: dict, policies: list[str], iters: int = 3, warm_s: float = 0.0) -> None:
    from diffusers import GlmImageTransformer2DModel

    from benchmarks.dit_gpu import T_GLYPH, torch_inputs
    from conversion.tables import dit as dit_table
    from glm_jax.models.dit import DiTConfig, GlmImageDiT, dit_flops
    rng = np.random.default_rng(0)
    cfg = DiTConfig.from_hf(DIT_CONFIG)
    flops = 3 * dit_flops(cfg, (H // 16) * (W // 16), T_GLYPH, 0)
    res["dit_fwd_bwd_tflop"] = flops / 1e12
    res["dit_timing"] = {"iters": iters, "warm_s": warm_s}
    torch.manual_seed(0)
    with torch.device(DEV):
        tm = GlmImageTransformer2DModel(**{k: v for k, v in DIT_CONFIG.items() if not k.startswith("_")}
                                        ).to(torch.bfloat16)
    lat, glyph, prior, drop, t, size, crop = torch_inputs(rng)
    cot = torch.randn_like(lat)

    def tfwdbwd():
        tm.zero_grad(set_to_none=True)
        out = tm(hidden_states=lat, encoder_hidden_states=glyph, prior_token_id=prior, prior_token_drop=drop,
                 timestep=t, target_size=size, crop_coords=crop, return_dict=False)[0]
        out.backward(cot)
    for ckpt in (False, True):
        if ckpt:
            tm.enable_gradient_checkpointing()
        tm.train()
        if DEV == "cuda":
            torch.cuda.reset_peak_memory_stats()
        r = timeit(tfwdbwd, sync=torch_sync, iters=iters, warm_s=warm_s)
        r["peak_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30 if DEV == "cuda" else None
        r["mfu"] = flops / r["median_s"] / PEAK
        res[f"torch_fwd_bwd_{'checkpointing' if ckpt else 'plain'}"] = r
        log(f"diffusers fwd+bwd checkpointing={ckpt}: {r['median_s']:.3f}s")
        _write("train_gpu_dit", res)
    tm.disable_gradient_checkpointing()
    tm.zero_grad(set_to_none=True)
    jm = module_from_torch(tm, dit_table.RULES, lambda: GlmImageDiT(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                                                                    attention=ATTN, rngs=nnx.Rngs(0)))
    to_j = lambda x: jax.dlpack.from_dlpack(x.contiguous())
    j_lat = jnp.transpose(to_j(lat), (0, 2, 3, 1))
    j_args = (to_j(glyph), to_j(prior).astype(jnp.int32), to_j(drop), to_j(t).astype(jnp.float32),
              to_j(size).astype(jnp.float32), to_j(crop).astype(jnp.float32))
    j_cot = jnp.transpose(to_j(cot), (0, 2, 3, 1))
    tm = lat = glyph = prior = cot = None
    gc.collect()
    if DEV == "cuda":
        torch.cuda.empty_cache()
    for policy in policies:
        jm.remat = policy
        graphdef, state = nnx.split(jm)

        @jax.jit
        def jgrad(state, lat, args, cot, graphdef=graphdef):
            def f(s):
                out = nnx.merge(graphdef, s)(lat, *args)[0]
                return jnp.vdot(out.astype(jnp.float32), cot.astype(jnp.float32))
            return jax.grad(f)(state)
        try:
            t0 = time.time()
            jgrad = jgrad.lower(state, j_lat, j_args, j_cot).compile()
            mem = jgrad.memory_analysis()
            temp_gib = (mem.temp_size_in_bytes if mem is not None else 0) / 2 ** 30
            jax_sync(jgrad(state, j_lat, j_args, j_cot))
            compile_s = time.time() - t0
            r = timeit(lambda jgrad=jgrad, state=state: jgrad(state, j_lat, j_args, j_cot), sync=jax_sync,
                       iters=iters, warm_s=warm_s)
            r.update(compile_s=compile_s, peak_gib=peak_gib(), temp_gib=temp_gib,
                     mfu=flops / r["median_s"] / PEAK, tflops_per_s=flops / r["median_s"] / 1e12)
            res[f"jax_fwd_bwd_remat_{policy}"] = r
            log(f"jax fwd+bwd remat={policy}: {r['median_s']:.3f}s, temporary {temp_gib:.2f} GiB, "
                f"peak so far {r['peak_gib']:.1f} GiB")
        except Exception as e:  # report and continue
            res[f"jax_fwd_bwd_remat_{policy}_error"] = repr(e)[:400]
            log(f"remat={policy} failed: {e!r}"[:300])
        jgrad = None
        jax.clear_caches()
        gc.collect()
        _write("train_gpu_dit", res)


def run_ar(res: dict, layers: int, batch: int, micro: int, policies: list[str]) -> None:
    from benchmarks.ar_gpu import build_torch
    from benchmarks.common import prompts
    from conversion.tables.ar import RULES
    from glm_jax.grpo import optim as O
    from glm_jax.grpo import train_step as T
    from glm_jax.models.ar import ArConfig, GlmImageAR
    from glm_jax.pipeline import ar_token_ids
    from glm_jax.sampling.ar_sampler import ArLayout, SamplingParams

    conf = dict(AR_CONFIG)
    conf["text_config"] = dict(conf["text_config"], num_hidden_layers=layers)
    cfg = ArConfig.from_hf(conf)
    n_codes, eos = ar_token_ids(cfg)
    layout = ArLayout.t2i(H, W)
    rng = np.random.default_rng(0)
    p = prompts(cfg, batch, layout, rng)
    n = layout.n_tokens
    tokens = np.concatenate([rng.integers(0, n_codes, (batch, n - 1)), np.full((batch, 1), eos)], 1)
    seq = p.input_ids.shape[1] + n - 2
    flops = ar_flops(cfg, seq, batch)
    res.update(ar_layers=layers, ar_batch=batch, ar_micro_batch=micro, ar_tokens_per_seq=seq,
               ar_update_tflop=flops / 1e12)

    tm = build_torch(conf).train()
    jm = module_from_torch(tm, RULES, lambda: GlmImageAR(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                                                          rngs=nnx.Rngs(0), implementation=ATTN))

    # -- PyTorch: forward + backward of micro-batches of a weighted log-softmax loss, then AdamW --------------
    ids_all = torch.tensor(np.concatenate([p.input_ids, tokens[:, :n - 2]], 1), device=DEV)
    am_all = torch.tensor(np.concatenate([p.attention_mask, np.ones((batch, n - 2), np.int32)], 1), device=DEV)
    tgt = torch.tensor(tokens[:, :n - 1], device=DEV)
    adv = torch.tensor(rng.standard_normal(batch), device=DEV, dtype=torch.float32)
    params = [q for name, q in tm.named_parameters() if not name.startswith(("model.visual", "model.vqmodel"))]
    for q in tm.parameters():
        q.requires_grad_(False)
    for q in params:
        q.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1e-6, foreach=True)
    tm.train()

    def tstep():
        opt.zero_grad(set_to_none=True)
        for s in range(0, batch, micro):
            sl = slice(s, s + micro)
            logits = tm(input_ids=ids_all[sl], attention_mask=am_all[sl], logits_to_keep=n - 1).logits
            lp = torch.log_softmax(logits.float(), -1).gather(-1, tgt[sl][..., None])[..., 0]
            (-(lp.mean(-1) * adv[sl]).sum() / batch).backward()
        opt.step()
    try:
        if DEV == "cuda":
            torch.cuda.reset_peak_memory_stats()
        r = timeit(tstep, sync=torch_sync, warmup=1, iters=3)
        r.update(peak_gib=torch.cuda.max_memory_allocated() / 2 ** 30 if DEV == "cuda" else None,
                 mfu=flops / r["median_s"] / PEAK)
        res["torch_ar_update"] = r
        log(f"torch AR update: {r['median_s']:.3f}s")
    except Exception as e:
        res["torch_ar_update_error"] = repr(e)[:400]
        log(f"torch AR update failed: {e!r}"[:300])
    _write("train_gpu_ar", res)
    opt = tm = params = None
    gc.collect()
    if DEV == "cuda":
        torch.cuda.empty_cache()

    # -- JAX: the GRPO update step ---------------------------------------------------------------------------
    tx = O.make_optimizer(O.OptimConfig(lr=1e-6, grad_clip=1.0))
    sampling = SamplingParams(temperature=0.9, top_k=None, top_p=0.75)
    arr = lambda a: jnp.asarray(a)
    batch_arrays = T.ArBatch(arr(p.input_ids), arr(p.attention_mask), arr(p.position_ids), arr(p.decode_positions),
                             arr(tokens.astype(np.int32)), jnp.broadcast_to(arr(layout.loss_mask()), (batch, n)),
                             arr(rng.standard_normal(batch).astype(np.float32)), jnp.ones((batch,), jnp.float32))
    for policy in policies:
        jm.text.remat = policy
        graphdef, pol = T.init_policy(jm, tx, T.ar_trainable, copy=True)
        spec = T.ArSpec(graphdef, tx, T.ArLossConfig(n_codes=n_codes, eos_id=eos, sampling=sampling,
                                                     micro_batch=micro))
        ts = T.init_train_state(jax.random.key(0), ar=pol)
        pol = None
        try:
            t0 = time.time()
            ts, m = T.ar_update_jit(spec, ts, batch_arrays)
            jax_sync(m)
            compile_s = time.time() - t0
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                ts, m = T.ar_update_jit(spec, ts, batch_arrays)
                jax_sync(m)
                times.append(time.perf_counter() - t0)
            med = float(np.median(times))
            res[f"jax_ar_update_remat_{policy}"] = {
                "median_s": med, "min_s": min(times), "compile_s": compile_s, "peak_gib": peak_gib(),
                "mfu": flops / med / PEAK, "tflops_per_s": flops / med / 1e12,
                "loss": float(m["loss"]), "grad_norm": float(m["grad_norm"])}
            log(f"jax AR update remat={policy}: {med:.3f}s")
        except Exception as e:
            res[f"jax_ar_update_remat_{policy}_error"] = repr(e)[:400]
            log(f"jax AR update remat={policy} failed: {e!r}"[:300])
        ts = m = None
        jax.clear_caches()
        gc.collect()
        _write("train_gpu_ar", res)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=("ar", "dit"), required=True)
    ap.add_argument("--policies", default="none,dots,full")
    ap.add_argument("--iters", type=int, default=3, help="timed DiT steps per variant (median reported)")
    ap.add_argument("--warm", type=float, default=0.0, help="seconds of DiT steps before timing each variant, so "
                    "that each side is timed on a card at its running temperature and power state (default 0: "
                    "2 warm-up steps only)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--micro", type=int, default=8)
    a = ap.parse_args()
    res = {"device": device_info()}
    if a.part == "dit":
        run_dit(res, a.policies.split(","), a.iters, a.warm)
    else:
        run_ar(res, 2 if SMOKE else a.layers, 4 if SMOKE else a.batch, 2 if SMOKE else a.micro,
               a.policies.split(","))


if __name__ == "__main__":
    main()
