#!/usr/bin/env python
"""Replay a greedy benchmark's outputs to compare prompt-lookup settings offline, in seconds.

Greedy output does not depend on the drafter, so for every turn of a finished run the exact acceptance
of any lookup draft is known: replay the rounds with each setting, charge each verification of ``k``
drafts the measured cost (``scripts/verify_cost.py``; in plain steps), and report the mean tokens per
plain-step time per task. ``hybrid`` replays the real controller (lookup only: the layer-skip draft
cannot be replayed).

Usage: python scripts/lookup_replay.py results/hybrid-greedy --questions ../shared/data/spec_bench/question.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from clasp_decoding.bench.suite import load_questions  # noqa: E402
from clasp_decoding.drafting.controller import Controller, ControllerState  # noqa: E402
from clasp_decoding.drafting.lookup import NgramIndex  # noqa: E402
from clasp_decoding.fetch import fetch_builtin  # noqa: E402
from clasp_decoding.text import encode_prompt  # noqa: E402

# Verification cost in plain steps by drafts, measured by scripts/verify_cost.py (qwen2.5-coder-1.5b, bf16).
COST = ((0, 1.0), (1, 1.015), (2, 1.033), (4, 1.068), (8, 1.10), (12, 1.16), (16, 1.26), (24, 1.36), (32, 1.73))
SETTINGS = {
    "pld 2-4 grams, 10 tokens": dict(lo=2, n=10),
    "pld 1-4 grams, 10 tokens": dict(lo=1, n=10),
    "pld 1-4 grams, 16 tokens": dict(lo=1, n=16),
    "pld 1-4 grams, 31 tokens": dict(lo=1, n=31),
    "hybrid (lookup only), up to 31": dict(lo=1, n=48, controller=True),
}


def cost(k: int) -> float:
    for (a, x), (b, y) in zip(COST, COST[1:], strict=False):
        if a <= k <= b:
            return x + (y - x) * (k - a) / (b - a)
    return COST[-1][1]


def turns(out: Path, questions: str, tokenizer) -> list[tuple[str, list[int], list[int]]]:
    """(task, prompt ids, greedy output ids) for every turn of the baseline's records."""
    qs = {q.id: q for q in load_questions(questions)}
    rows = [json.loads(line) for line in (out / "records.jsonl").open()]
    base = [r for r in rows if r["method"] == "hf" and r["status"] == "ok"]
    answers = {(r["question_id"], r["turn"]): r["output_ids"] for r in base}
    result = []
    for r in base:
        messages = []
        for t in range(r["turn"] + 1):
            messages.append({"role": "user", "content": qs[r["question_id"]].turns[t]})
            if t < r["turn"]:
                text = tokenizer.decode(answers[(r["question_id"], t)], skip_special_tokens=True)
                messages.append({"role": "assistant", "content": text})
        result.append((r["task"], encode_prompt(tokenizer, messages), r["output_ids"]))
    return result


def replay(data, lo: int, n: int, controller: bool = False, cap: int = 31) -> dict[str, float]:
    state = ControllerState()
    per_task: dict[str, list[float]] = defaultdict(list)
    for task, prompt, out in data:
        ctrl = Controller(state, max_draft=8, candidates=[8], layer_skip=False)
        lookup = NgramIndex(lo, 4)
        ctx, done, time = [*prompt, out[0]], 1, 1.0
        while done < len(out):
            budget = min(len(out) - done - 1, cap)
            found, match = lookup.lookup(ctx, min(budget, n))
            k = len(found)
            if controller:
                plan = ctrl.plan(8, k, budget, match)
                k = plan.max_tokens if plan.source == "pld" else 0
            a = 0
            while a < k and found[a] == out[done + a]:
                a += 1
            ctrl.observe("pld" if k else "plain", k, a, cost(k), 0.0, 8, match)
            time += cost(k)
            ctx += out[done : done + a + 1]
            done += a + 1
        per_task[task].append(len(out) / time)
    means = {t: sum(v) / len(v) for t, v in per_task.items()}
    means["overall"] = sum(x for v in per_task.values() for x in v) / sum(len(v) for v in per_task.values())
    return means


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="a finished greedy `clasp bench` output folder")
    ap.add_argument("--questions", required=True)
    ap.add_argument("--model", default="qwen2.5-coder-1.5b")
    args = ap.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(fetch_builtin(args.model, quiet=True))
    data = turns(args.out, args.questions, tokenizer)
    rows = {name: replay(data, **kw) for name, kw in SETTINGS.items()}
    tasks = list(next(iter(rows.values())))
    print("| setting | " + " | ".join(tasks) + " |\n|" + " --- |" * (len(tasks) + 1))
    for name, means in rows.items():
        print(f"| {name} | " + " | ".join(f"{means[t]:.2f}" for t in tasks) + " |")


if __name__ == "__main__":
    main()
