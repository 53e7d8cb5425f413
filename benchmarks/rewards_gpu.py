"""Times the array rewards (LPIPS AlexNet / VGG, SSIM, structure) per 1024x1024 image on the accelerator and prints
a markdown table. Two numbers per reward: the full reward call (host targets -> device, resize, score, result
back to host) and the jitted core on device-resident inputs. Median of `--runs` runs after a warm-up.
Usage: `python benchmarks/rewards_gpu.py [--size 1024] [--batch 8] [--runs 5] [--rewards lpips_alex,ssim]`."""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np

from glm_jax import rewards as R
from glm_jax.rewards.lpips import load_params, lpips_distance
from glm_jax.rewards.ssim import ssim
from glm_jax.rewards.structure import _structure_uint8


def scene_batch(b: int, size: int, seed: int) -> np.ndarray:
    """Smooth random colour fields with sharp-edged blocks (no PIL needed on the GPU host)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = np.empty((b, size, size, 3), np.uint8)
    for i in range(b):
        c0, c1 = rng.uniform(60, 200, 3), rng.uniform(-50, 50, (2, 3))
        img = c0 + xx[..., None] * c1[0] + yy[..., None] * c1[1]
        for _ in range(12):
            y0, x0 = rng.integers(0, size * 3 // 4, 2)
            hh, ww = rng.integers(size // 20, size // 4, 2)
            img[y0:y0 + hh, x0:x0 + ww] = rng.uniform(0, 255, 3)
        out[i] = np.clip(img + rng.normal(0, 4, img.shape), 0, 255)
    return out


def timed(fn, runs: int) -> float:
    jax.block_until_ready(fn())
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--rewards", default="lpips_alex,lpips_vgg,ssim,structure")
    args = ap.parse_args()
    b, s = args.batch, args.size
    targets_host = scene_batch(b, s, 0)
    images_host = np.clip(targets_host.astype(int) + np.random.default_rng(1).normal(0, 12, targets_host.shape),
                          0, 255).astype(np.uint8)
    images = jax.device_put(images_host)
    ctx = R.RewardContext.make(["p"] * b, list(targets_host), list(targets_host))
    x = jax.device_put(images_host.astype(np.float32))
    y = jax.device_put(targets_host.astype(np.float32))

    xn, yn, y_u8 = x / 127.5 - 1, y / 127.5 - 1, jax.device_put(targets_host)
    ssim_j = jax.jit(ssim)
    cores = {
        "lpips_alex": lambda: lpips_distance(load_params("alex"), xn, yn, net="alex"),
        "lpips_vgg": lambda: lpips_distance(load_params("vgg"), xn, yn, net="vgg"),
        "ssim": lambda: ssim_j(x, y),
        "structure": lambda: _structure_uint8(x, y_u8, (s, s), "edges", 1.0),
    }
    rewards = {"lpips_alex": ("lpips", {"net": "alex"}), "lpips_vgg": ("lpips", {"net": "vgg"}),
               "ssim": ("ssim", {}), "structure": ("structure", {})}
    rows = []
    for label in args.rewards.split(","):
        name, opts = rewards[label]
        reward = R.make_reward(name, **opts)
        t0 = time.perf_counter()
        reward(images, ctx)
        first = time.perf_counter() - t0
        call = statistics.median([reward(images, ctx).seconds for _ in range(args.runs)])
        core = timed(cores[label], args.runs)
        rows.append((label, 1e3 * call / b, 1e3 * core / b, first))
        print(f"{label}: call {1e3 * call / b:.2f} ms/img, core {1e3 * core / b:.2f} ms/img", flush=True)

    dev = jax.devices()[0]
    print(f"\nArray rewards on {dev.device_kind} ({dev.platform}), {s}x{s} images, batch {b}, median of "
          f"{args.runs} runs, float32, jax {jax.__version__}, default matmul precision\n")
    print("| reward | reward call ms / image | jitted core ms / image | first call s (incl. compile) |")
    print("|---|---:|---:|---:|")
    for label, call, core, first in rows:
        print(f"| {label} | {call:.2f} | {core:.2f} | {first:.1f} |")


if __name__ == "__main__":
    main()
