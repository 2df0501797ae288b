#!/usr/bin/env python
"""Per-question speedups and mean accepted tokens from a benchmark's records.jsonl.

Usage: python scripts/per_question.py results/run1 [--baseline hf] [--methods clasp,hybrid]
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from clasp_decoding.bench.run import read_records  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--baseline", default="hf")
    ap.add_argument("--methods", default=None)
    a = ap.parse_args()
    rows = [r for r in read_records(Path(a.out)) if r["status"] == "ok" and r["repeat"] == 0]
    agg: dict[tuple[str, str], dict] = defaultdict(
        lambda: {"tokens": 0, "seconds": 0.0, "steps": 0, "task": "", "ids": []}
    )
    for r in rows:
        g = agg[(r["method"], str(r["question_id"]))]
        g["tokens"] += r["new_tokens"]
        g["seconds"] += r["seconds"]
        g["steps"] += r["steps"]
        g["task"] = r["task"]
        g["ids"].append(r["output_ids"])
    methods = a.methods.split(",") if a.methods else sorted({m for m, _ in agg if m != a.baseline})
    questions = sorted({q for m, q in agg if m == a.baseline}, key=lambda q: (agg[(a.baseline, q)]["task"], q))
    print("| question | task | " + " | ".join(f"{m}: speedup (tau)" for m in methods) + " | identical |")
    print("| --- | --- | " + " | ".join("---" for _ in methods) + " | --- |")
    for q in questions:
        base = agg[(a.baseline, q)]
        tps = base["tokens"] / base["seconds"]
        cells, same = [], True
        for m in methods:
            g = agg.get((m, q))
            if not g:
                cells.append("")
                continue
            cells.append(f"{g['tokens'] / g['seconds'] / tps:.2f}x ({g['tokens'] / g['steps']:.2f})")
            same &= g["ids"] == base["ids"]
        print(f"| {q} | {base['task']} | " + " | ".join(cells) + f" | {'yes' if same else 'NO'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
