"""Shared benchmark helpers: timing, torch -> glm_jax conversion on the device, result files."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from conversion.table import find_torch


def timeit(fn: Callable, *, warmup: int = 2, iters: int = 5, sync: Callable = lambda out: out,
           warm_s: float = 0.0) -> dict:
    """Median / min wall time of `fn()` after `warmup` calls and then more calls until `warm_s` seconds have
    passed (a GPU at its power cap runs a cold card's first steps faster); `sync(out)` blocks until the result is
    ready."""
    t_start = time.perf_counter()
    done = 0
    while done < warmup or time.perf_counter() - t_start < warm_s:
        sync(fn())
        done += 1
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "iters": iters}


def back_to_back(fn: Callable, *args, calls: int = 30, runs: int = 5) -> float:
    """Seconds per call of `fn(*args)` with `calls` calls issued back to back (each dispatched while the last runs,
    so a kernel's own time without the per-call wait), median of `runs`."""
    jax.block_until_ready(fn(*args))
    per = []
    for _ in range(runs):
        t0 = time.perf_counter()
        for _ in range(calls):
            out = fn(*args)
        jax.block_until_ready(out)
        per.append((time.perf_counter() - t0) / calls)
    return statistics.median(per)


def jax_sync(out):
    jax.block_until_ready(out)
    return out


SMOKE = os.environ.get("BENCH_SMOKE") == "1"   # tiny configs on CPU, to check a script before GPU time


def torch_device() -> str:
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def torch_sync(out):
    import torch
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out


def module_from_torch(torch_model, rules, build: Callable[[], nnx.Module], ignore=()) -> nnx.Module:
    """Fills an abstract glm_jax module from a torch model's state dict, tensor by tensor, on the device
    (through DLPack, so weights never visit the host)."""
    abstract = nnx.eval_shape(build)
    graphdef, state = nnx.split(abstract)
    pairs = list(nnx.to_flat_state(state))
    flat = {".".join(str(p) for p in path): var for path, var in pairs}
    filled = set()
    for key, tensor in torch_model.state_dict().items():
        if key in ignore:
            continue
        hit = find_torch(rules, key)
        if hit is None:
            raise KeyError(f"no rule for {key}")
        path, rule = hit
        arr = jax.dlpack.from_dlpack(tensor.detach().contiguous())
        if rule.transform == "linear":
            arr = arr.T
        elif rule.transform == "conv":
            arr = jnp.transpose(arr, (2, 3, 1, 0))
        var = flat[path]
        want = var.get_value()
        if arr.shape != want.shape:
            raise ValueError(f"{key}: {arr.shape} vs {want.shape}")
        var.set_value(jnp.array(arr, dtype=want.dtype, copy=True))
        filled.add(path)
    missing = set(flat) - filled
    if missing:
        raise KeyError(f"unfilled params: {sorted(missing)[:5]}")
    return nnx.merge(graphdef, nnx.from_flat_state(pairs))


def random_module(build: Callable[[], nnx.Module], seed: int = 0, scale: float = 0.02, mesh=None) -> nnx.Module:
    """A module with random parameters, filled one array at a time on the device (no compile of a whole-model
    initialiser, which takes minutes at 10B parameters): norm weights 1, biases 0 (1-D arrays), everything else
    N(0, scale²). With `mesh`, every array is drawn straight into its logical-axis sharding
    (`sharded_load.module_shardings`): each device draws only its own slices, with no host copy, so it works with
    several processes too."""
    abstract = nnx.eval_shape(build)
    graphdef, state = nnx.split(abstract)
    pairs = list(nnx.to_flat_state(state))
    key = jax.random.key(seed)
    if mesh is None:
        normal = jax.jit(jax.random.normal, static_argnums=(1, 2))
        for i, (path, var) in enumerate(pairs):
            want = var.get_value()
            if want.ndim == 1:
                fill = jnp.ones if str(path[-1]) == "weight" else jnp.zeros
                var.set_value(fill(want.shape, want.dtype))
            else:
                var.set_value(normal(jax.random.fold_in(key, i), want.shape, want.dtype)
                              * jnp.asarray(scale, want.dtype))
        return nnx.merge(graphdef, nnx.from_flat_state(pairs))
    from glm_jax.sharded_load import module_shardings
    from glm_jax.sharding import path_str
    table = module_shardings(abstract, mesh)
    fns: dict = {}
    for i, (path, var) in enumerate(pairs):
        want = var.get_value()
        kind = ("ones" if str(path[-1]) == "weight" else "zeros") if want.ndim == 1 else "normal"
        sh = table[path_str(path)]
        k = (kind, want.shape, want.dtype, sh)
        if k not in fns:
            if kind == "normal":
                fn = (lambda r, s=want.shape, d=want.dtype: jax.random.normal(r, s, d) * jnp.asarray(scale, d))
            else:
                fn = (lambda r, s=want.shape, d=want.dtype, f=jnp.ones if kind == "ones" else jnp.zeros: f(s, d))
            fns[k] = jax.jit(fn, out_shardings=sh)
        var.set_value(fns[k](jax.random.fold_in(key, i)))
    return nnx.merge(graphdef, nnx.from_flat_state(pairs))


def device_info() -> dict:
    info = {"jax": jax.__version__, "devices": [str(d) for d in jax.devices()]}
    try:
        info["gpu"] = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                                      "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
    except OSError:
        pass
    info["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    if "torch" in sys.modules:      # the PyTorch reference's versions, where the benchmark runs one
        torch = sys.modules["torch"]
        info["torch"] = f"{torch.__version__}, cuDNN {torch.backends.cudnn.version()}"
    return info


def write_result(name: str, result: dict) -> None:
    out = os.environ.get("OUT", "out")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{name}.json"), "w") as f:
        json.dump(result, f, indent=2, default=str)
    print(json.dumps(result, indent=2, default=str))


def prompts(cfg, batch: int, layout, rng):
    """Random AR text prompts of 47-63 tokens + the image-start token, left-padded, with the t2i `layout`'s grids
    (`ArPrompts`)."""
    from glm_jax.pipeline import ar_prompts_from_ids
    lo = cfg.text.vision_vocab_size
    hi = lo + min(100_000, (cfg.text.vocab_size - lo) // 2)   # plain text ids, clear of the special tokens
    seqs = [list(rng.integers(lo, hi, int(rng.integers(47, 64))))
            + [cfg.image_start_token_id] for _ in range(batch)]
    grids = [[[1, *layout.target], [1, *layout.preview]]] * batch
    return ar_prompts_from_ids(seqs, grids, layout, cfg)


def ar_flops(cfg, tokens_per_seq: int, n_seq: int, weight_grads: bool = True) -> float:
    """Model FLOPs of one AR forward + backward over `n_seq` sequences: 6·N·tokens for the matmuls (4·N·tokens
    without weight gradients, e.g. LoRA on frozen kernels) plus the attention scores."""
    t = cfg.text
    per_layer = (t.hidden_size * (t.num_heads + 2 * t.num_kv_heads) * t.head_dim + t.num_heads * t.head_dim
                 * t.hidden_size + 3 * t.hidden_size * t.intermediate_size)
    n_mat = t.num_layers * per_layer + t.hidden_size * t.vision_vocab_size
    attn = t.num_layers * 4 * tokens_per_seq ** 2 * t.num_heads * t.head_dim
    return (6 if weight_grads else 4) * n_mat * tokens_per_seq * n_seq + 3 * attn * n_seq
