#!/usr/bin/env python
"""What verifying ``k`` drafted tokens costs, as a multiple of one plain decoding step: the curve the
hybrid's controller learns online, measured once offline (median of 6 calls per length, after a
300-token context, through the project's runner).

Usage: python scripts/verify_cost.py [--model qwen2.5-coder-1.5b] [--dtype bf16]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from clasp_decoding.api import runner_for  # noqa: E402
from clasp_decoding.models import load  # noqa: E402

LENGTHS = (0, 1, 2, 4, 8, 12, 16, 24, 31, 32, 48)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-coder-1.5b")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--context", type=int, default=300)
    args = ap.parse_args()
    model, _ = load(args.model, dtype=args.dtype, quiet=True)
    runner = runner_for(model)
    g = torch.Generator().manual_seed(0)
    n = args.context
    cache = runner.new_cache(n + max(LENGTHS) + 2)
    runner.forward(cache, torch.randint(100, 20000, (n,), generator=g), 0, last_only=True)
    cache.rollback(n)
    base = None
    print(
        f"{args.model} ({args.dtype}), context {n}; exact verification up to "
        f"{runner.numerics.max_verify_drafts} drafts per call"
    )
    print("| drafts k | ms | x plain step |\n| --- | --- | --- |")
    for k in LENGTHS:
        times = []
        for _ in range(6):
            x = torch.randint(100, 20000, (k + 1,), generator=g)
            t0 = time.perf_counter()
            logits, _ = runner.forward(cache, x, n)
            logits.argmax(-1).tolist()  # the host sync a verification ends with
            times.append(time.perf_counter() - t0)
            cache.rollback(n)
        ms = 1000 * sorted(times)[len(times) // 2]
        base = base or ms
        print(f"| {k} | {ms:.1f} | {ms / base:.2f} |")


if __name__ == "__main__":
    main()
