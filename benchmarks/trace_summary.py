"""Summarise a `jax.profiler` perfetto trace: total GPU kernel time by kernel name (top N) and by category
(attention / gemm / copy / reduction / elementwise, from the kernel names); `op_sequence` lists the last step's
kernels in launch order with the XLA instruction that launched each (where CUDA graphs are off); `timeline` where
the GPU sat idle between kernels.

    python -m benchmarks.trace_summary TRACE_DIR [--top 40] [--steps N] [--sequence | --timeline]
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os


def load_events(trace_dir: str) -> tuple[list[dict], dict[int, str]]:
    files = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
    if not files:
        raise FileNotFoundError(f"no *.trace.json.gz under {trace_dir}")
    with gzip.open(max(files), "rt") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    names = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    return events, names


CATEGORIES = (  # first match wins; kernel names as the CUDA profiler reports them
    ("attention", ("cudnn", "fmha", "flash", "sdpa")),
    ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "triton_gemm", "dot")),
    ("copy", ("memcpy", "memset", "copy", "transpose", "concatenate", "slice")),
    ("reduction", ("reduce",)),
)


def category(name: str) -> str:
    low = name.lower()
    for cat, keys in CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "elementwise / other"


def gpu_kernels(events: list[dict], pnames: dict[int, str]) -> tuple[list[dict], set[int], dict]:
    """The kernel events (on the GPU processes' stream threads, where threads are named), the GPU process ids
    and the names of their threads."""
    gpu_pids = {pid for pid, n in pnames.items() if "GPU" in n or "gpu" in n or "stream" in n.lower()}
    tnames = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
              if e.get("ph") == "M" and e.get("name") == "thread_name" and e.get("pid") in gpu_pids}
    streams = {k for k, n in tnames.items() if n.lower().startswith("stream")}
    kernels = [e for e in events if e.get("ph") == "X" and "dur" in e and e.get("pid") in gpu_pids
               and (not streams or (e.get("pid"), e.get("tid")) in streams)]
    return kernels, gpu_pids, tnames


def summarise(trace_dir: str, top: int = 40, steps: int = 1) -> dict:
    events, pnames = load_events(trace_dir)
    kernels, gpu_pids, tnames = gpu_kernels(events, pnames)
    by_name: collections.Counter = collections.Counter()
    count: collections.Counter = collections.Counter()
    for e in kernels:
        by_name[e["name"]] += e["dur"]
        count[e["name"]] += 1
    total = sum(by_name.values())
    by_cat: collections.Counter = collections.Counter()
    n_cat: collections.Counter = collections.Counter()
    for n, d in by_name.items():
        by_cat[category(n)] += d
        n_cat[category(n)] += count[n]
    cats = {c: {"us_per_step": d / steps, "calls_per_step": n_cat[c] / steps, "share": d / max(total, 1)}
            for c, d in by_cat.most_common()}
    rows = [{"name": n[:120], "us_per_step": d / steps, "calls_per_step": count[n] / steps,
             "share": d / max(total, 1)} for n, d in by_name.most_common(top)]
    return {"gpu_processes": sorted(pnames[p] for p in gpu_pids), "threads": sorted(set(tnames.values()))[:20], "kernel_us_per_step": total / steps,
            "kernels_per_step": sum(count.values()) / steps, "categories": cats, "top": rows}


def summary_lines(summary: dict, top: int = 15, width: int = 90) -> list[str]:
    """`summarise`'s result as log lines: GPU time and kernels per category, then the `top` kernels by time."""
    lines = [f"{c}: {v['us_per_step'] / 1e3:.1f} ms, {v['calls_per_step']:.0f} kernels"
             for c, v in summary["categories"].items()]
    lines += [f"  {row['us_per_step'] / 1e3:7.2f} ms  x{row['calls_per_step']:.0f}  {row['name'][:width]}"
              for row in summary["top"][:top]]
    return lines


def op_sequence(trace_dir: str) -> list[tuple[str, str, float]]:
    """GPU kernels of the last step in launch order as `(XLA instruction, kernel, microseconds)`. The instruction
    is recorded only where XLA launches kernels one by one (`--xla_gpu_enable_command_buffer=` turns CUDA graphs
    off); steps are told apart by gaps of more than 1 ms between kernels."""
    kern = sorted(gpu_kernels(*load_events(trace_dir))[0], key=lambda e: e["ts"])
    start = 0
    for i in range(1, len(kern)):
        if kern[i]["ts"] - (kern[i - 1]["ts"] + kern[i - 1]["dur"]) > 1000:
            start = i
    return [((e.get("args") or {}).get("hlo_op", ""), e["name"][:60], e["dur"]) for e in kern[start:]]


def timeline(trace_dir: str, top: int = 12) -> dict:
    """Where the GPU sat idle in the traced window: the span from the first kernel's start to the last one's end,
    the time covered by kernels (their union, streams merged), the idle rest, and the `top` longest gaps with
    the kernels on either side (XLA instructions where CUDA graphs are off)."""
    kern = sorted(gpu_kernels(*load_events(trace_dir))[0], key=lambda e: e["ts"])
    if not kern:
        return {}
    busy, gaps, end = 0.0, [], kern[0]["ts"]
    prev = kern[0]
    for e in kern:
        if e["ts"] > end:
            gaps.append((e["ts"] - end, prev, e))
        busy += max(0.0, e["ts"] + e["dur"] - max(end, e["ts"]))
        if e["ts"] + e["dur"] >= end:
            end, prev = e["ts"] + e["dur"], e
    span = end - kern[0]["ts"]

    def label(e):
        return ((e.get("args") or {}).get("hlo_op", "") + " " + e["name"][:60]).strip()
    gaps.sort(key=lambda g: -g[0])
    small = sum(g for g, _, _ in gaps if g <= 10)
    return {"span_us": span, "busy_us": busy, "idle_us": span - busy, "gaps": len(gaps),
            "idle_in_gaps_under_10us": small,
            "top_gaps": [{"us": g, "after": label(a), "before": label(b)} for g, a, b in gaps[:top]]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("trace_dir")
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--sequence", action="store_true", help="print the last step's kernels in launch order")
    ap.add_argument("--timeline", action="store_true", help="print the idle time between kernels and the longest gaps")
    a = ap.parse_args()
    if a.timeline:
        print(json.dumps(timeline(a.trace_dir, a.top), indent=1))
        return
    if a.sequence:
        for op, kernel, us in op_sequence(a.trace_dir):
            print(f"{us:9.1f}  {op:40s}  {kernel}")
        return
    print(json.dumps(summarise(a.trace_dir, a.top, a.steps), indent=1))


if __name__ == "__main__":
    main()
