"""Times each reward per 1024x1024 image on the CPU (median of a few runs after a warm-up call) and prints a
markdown table. Usage: `.venv/bin/python benchmarks/rewards_cpu.py [--size 1024] [--batch 2] [--runs 3]
[--rewards lpips,ssim,...]`. The remote reward is timed against a local echo server (PNG encoding + HTTP)."""

from __future__ import annotations

import argparse
import http.server
import json
import os
import platform
import statistics
import threading
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from glm_jax import rewards as R

FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf"


def scene(size: int, seed: int, text: str) -> np.ndarray:
    """A gradient with shapes and a line of text, `size` x `size`."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    c0, c1 = rng.uniform(60, 200, 3), rng.uniform(-50, 50, (2, 3))
    im = Image.fromarray(np.clip(c0 + xx[..., None] * c1[0] + yy[..., None] * c1[1], 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(im)
    for _ in range(12):
        x0, y0 = rng.uniform(0, size * 0.8, 2)
        x1, y1 = x0 + rng.uniform(0.05, 0.3) * size, y0 + rng.uniform(0.05, 0.3) * size
        (d.ellipse if rng.random() < 0.5 else d.rectangle)((x0, y0, x1, y1),
                                                          fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    d.text((size * 0.08, size * 0.45), text, font=ImageFont.truetype(FONT, size // 12), fill=(10, 10, 20))
    return np.asarray(im)


class _Echo(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        out = json.dumps({"scores": [0.0] * len(body["images"])}).encode()
        self.send_response(200)
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args):
        pass


def echo_server() -> tuple[http.server.ThreadingHTTPServer, str]:
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, f"http://127.0.0.1:{srv.server_address[1]}/"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--rewards", default="lpips_alex,lpips_vgg,ssim,structure,text,aesthetic_heuristic,remote")
    args = ap.parse_args()

    srv, url = echo_server()
    specs = {
        "lpips_alex": ("lpips", {"net": "alex"}),
        "lpips_vgg": ("lpips", {"net": "vgg"}),
        "ssim": ("ssim", {}),
        "structure": ("structure", {}),
        "text": ("text", {}),
        "aesthetic_heuristic": ("aesthetic_heuristic", {}),
        "remote": ("remote", {"url": url}),
    }
    b, s = args.batch, args.size
    targets = [scene(s, i, "GRAND OPENING") for i in range(b)]
    images = np.stack([scene(s, i, "GRAND OPENIN6") for i in range(b)])
    images[:, s // 3:s // 2] = np.clip(images[:, s // 3:s // 2].astype(int) + 25, 0, 255)
    ctx = R.RewardContext.make(['a storefront sign that says "GRAND OPENING"'] * b, targets, targets)

    rows = []
    for label in args.rewards.split(","):
        name, opts = specs[label]
        reward = R.make_reward(name, **opts)
        t0 = time.perf_counter()
        first = reward(images, ctx)
        warm = time.perf_counter() - t0
        times = [reward(images, ctx).seconds for _ in range(args.runs)]
        med = statistics.median(times)
        rows.append((label, 1e3 * med / b, 1e3 * warm / b, float(np.nanmean(first.scores))))
        print(f"{label}: {1e3 * med / b:.1f} ms/img", flush=True)
    srv.shutdown()

    cpu = platform.processor() or platform.machine()
    print(f"\nCPU rewards, {s}x{s} images, batch {b}, median of {args.runs} runs "
          f"(jax {jax.__version__}, {os.cpu_count()} cores, {cpu})\n")
    print("| reward | ms / image | first call ms / image (incl. compile) | mean score |")
    print("|---|---:|---:|---:|")
    for label, ms, warm_ms, score in rows:
        print(f"| {label} | {ms:.1f} | {warm_ms:.1f} | {score:.4f} |")


if __name__ == "__main__":
    main()
