#!/usr/bin/env python
"""One linear layer per row count, on this CPU: the project's kernel against torch's, in ms, GB/s of
weights read and share of the measured read bandwidth (docs/results.md, "Kernels").

Weights are rotated through more memory than the caches hold (as in decoding, where every layer's
weights come from memory), and the bandwidth is measured first by summing a 2 GB tensor.

Usage: python scripts/linear_costs.py [--shape 1536x8960,8960x1536] [--rows 1,2,4,8,16,32,64]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from clasp_decoding import kernels  # noqa: E402
from clasp_decoding.bench.run import machine_info  # noqa: E402


def read_bandwidth(gb: float = 2.0) -> float:
    """Bytes per second of reading memory with torch's threads: the best of five sums of ``gb`` GB."""
    x = torch.ones(int(gb * 2**30 / 4))
    x.sum()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best


def per_call(fn, weights: list[torch.Tensor]) -> float:
    for w in weights[:3]:
        fn(w)
    t0 = time.perf_counter()
    for _ in range(2):
        for w in weights:
            fn(w)
    return (time.perf_counter() - t0) / (2 * len(weights))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="1536x8960,8960x1536,896x151936")
    ap.add_argument("--rows", default="1,2,4,8,16,32,64")
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    a = ap.parse_args()
    if not kernels.available():
        sys.exit("the project's kernels are not built here; nothing to compare")
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    info = machine_info()
    flags = Path("/proc/cpuinfo").read_text()
    features = ", ".join(f for f in ("amx_bf16", "avx512_bf16", "avx512f", "avx2") if f in flags)
    bw = read_bandwidth()
    print(f"{info['cpu']} ({features}); {info['torch_threads']} threads; torch {info['torch']}; kernels: "
          f"{kernels.isa()}; {a.dtype}; read bandwidth {bw / 1e9:.1f} GB/s (sum of 2 GB)\n")  # fmt: skip
    print(
        "| in x out | rows | torch ms | ours ms | torch GB/s | ours GB/s | ours, share of bandwidth | ours / ours at 1 row |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    g = torch.Generator().manual_seed(0)
    for shape in a.shape.split(","):
        k, n = (int(v) for v in shape.split("x"))
        size = n * k * (2 if dtype == torch.bfloat16 else 4)
        weights = [torch.randn(n, k, generator=g).to(dtype) for _ in range(max(4, int(1.2e9 / size)))]
        one = None
        for rows in (int(r) for r in a.rows.split(",")):
            x = torch.randn(rows, k, generator=g).to(dtype)
            theirs = per_call(lambda w, x=x: torch.nn.functional.linear(x, w), weights)
            ours = per_call(lambda w, x=x: kernels.linear(x, w), weights)
            one = one or ours
            print(f"| {k} x {n} | {rows} | {theirs * 1e3:.3f} | {ours * 1e3:.3f} | {size / theirs / 1e9:.1f} | "
                  f"{size / ours / 1e9:.1f} | {size / ours / bw:.0%} | {ours / one:.2f} |")  # fmt: skip
        del weights


if __name__ == "__main__":
    main()
