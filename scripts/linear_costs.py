#!/usr/bin/env python
"""One linear layer per row count, on this CPU: every kernel the project can run here (the tile kernels:
AMX and its AVX-512 twin; the best vector kernel) against torch's, in ms and GB/s of weights read
(docs/results.md, "Kernels"), and which one the measured choice installs.

Weights are cycled through more memory than the last-level cache holds (as in decoding, where every
layer's weights come from memory; a one-matrix loop on a CPU with hundreds of MB of L3 measures the
cache). The kernels are interleaved call by call, and each figure is the best of ``--rounds`` passes, so
that a busy moment of a shared machine hits them all alike.

With ``--int8``, a second table: the int8 kernel a quantized draft runs (with and without its
next-block prefetch) against the installed bf16 kernel, one row (a draft step).

Usage: python scripts/linear_costs.py [--shape 1536x8960,8960x1536] [--rows 1,2,4,8,16,32,64] [--dtype bf16]
       [--int8]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from clasp_decoding import cpu_linear, kernels  # noqa: E402
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


def l3_bytes() -> int:
    return cpu_linear.last_level_cache_bytes()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="1536x8960,8960x1536,896x151936")
    ap.add_argument("--rows", default="1,2,4,8,16,32,64")
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--int8", action="store_true", help="also the int8 draft kernel, one row")
    a = ap.parse_args()
    if not kernels.available():
        sys.exit("the project's kernels are not built here; nothing to compare")
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    info = machine_info()
    flags = Path("/proc/cpuinfo").read_text()
    features = ", ".join(f for f in ("amx_bf16", "avx512_bf16", "avx512f", "avx2") if f in flags)
    bw = read_bandwidth()
    choice = cpu_linear.choice(dtype)
    candidates = [c for c in cpu_linear._candidates(dtype)]
    print(f"{info['cpu']} ({features}); {info['torch_threads']} threads; torch {info['torch']}; {a.dtype}; "
          f"read bandwidth {bw / 1e9:.1f} GB/s (sum of 2 GB); AMX: {kernels.amx_status()}")  # fmt: skip
    print(f"installed here: {choice.describe()}\n")
    print(f"| in x out | rows | {' | '.join(f'{c} ms' for c in candidates)} | best | best GB/s |")
    print(f"| --- | --- | {' | '.join('---' for _ in candidates)} | --- | --- |")
    g = torch.Generator().manual_seed(0)
    for shape in a.shape.split(","):
        k, n = (int(v) for v in shape.split("x"))
        size = n * k * (2 if dtype == torch.bfloat16 else 4)
        count = max(4, int(1.5 * l3_bytes() / size) + 1)
        weights = [torch.randn(n, k, generator=g).to(dtype) for _ in range(count)]
        with torch.inference_mode():
            calls = {c: [cpu_linear.product(c, w) for w in weights] for c in candidates}
            for rows in (int(r) for r in a.rows.split(",")):
                x = torch.randn(rows, k, generator=g).to(dtype)
                best = dict.fromkeys(candidates, float("inf"))
                for _ in range(a.rounds):
                    for c, fns in calls.items():
                        t0 = time.perf_counter()
                        for f in fns:
                            f(x)
                        best[c] = min(best[c], (time.perf_counter() - t0) / len(fns))
                top = min(best, key=best.get)
                cells = " | ".join(f"{best[c] * 1e3:.3f}" for c in candidates)
                print(f"| {k} x {n} | {rows} | {cells} | {top} | {size / best[top] / 1e9:.1f} |", flush=True)
        del weights, calls
    if a.int8 and dtype == torch.bfloat16:
        int8_table(a, choice, g)


def int8_table(a, choice, g) -> None:
    """One row through the int8 kernel (prefetch off, on) and through the installed bf16 kernel, weights
    cycled through more than the last-level cache."""
    from clasp_decoding.kernels import quantize_int8

    before = kernels.set_int8_prefetch(False)
    print(f"\nint8 draft kernel, one row (measured choice here: prefetch {cpu_linear.int8_prefetch()})\n")
    print("| in x out | bf16 installed ms | int8 ms | int8 + prefetch ms | best int8 / bf16 | int8 GB/s |")
    print("| --- | --- | --- | --- | --- | --- |")
    try:
        for shape in a.shape.split(","):
            k, n = (int(v) for v in shape.split("x"))
            count = max(4, int(1.5 * l3_bytes() / (n * k)) + 1)
            weights = [torch.randn(n, k, generator=g).bfloat16() for _ in range(count)]
            x = torch.randn(1, k, generator=g).bfloat16()
            with torch.inference_mode():
                dense = [cpu_linear.product(choice.member(1), w) for w in weights]
                quant = [quantize_int8(w) for w in weights]
                runs = {
                    "bf16": lambda: [f(x) for f in dense],
                    False: lambda: [kernels.linear_int8(x, q, s) for q, s in quant],
                    True: lambda: [kernels.linear_int8(x, q, s) for q, s in quant],
                }
                best = dict.fromkeys(runs, float("inf"))
                for _ in range(a.rounds):
                    for key, run in runs.items():
                        if key != "bf16":
                            kernels.set_int8_prefetch(key)
                        t0 = time.perf_counter()
                        run()
                        best[key] = min(best[key], (time.perf_counter() - t0) / count)
            i8 = min(best[False], best[True])
            print(
                f"| {k} x {n} | {best['bf16'] * 1e3:.3f} | {best[False] * 1e3:.3f} | {best[True] * 1e3:.3f} | "
                f"{i8 / best['bf16']:.2f} | {n * k / i8 / 1e9:.1f} |",
                flush=True,
            )
            del weights, dense, quant
    finally:
        kernels.set_int8_prefetch(before)


if __name__ == "__main__":
    main()
