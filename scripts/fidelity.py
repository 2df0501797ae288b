#!/usr/bin/env python3
"""What is identical to what (docs/numerics.md): greedy texts of plain ``transformers`` ``generate`` on an
untouched copy of the model, of the same ``generate`` when only the thread count or the batch shape
changes, of our plain decoding (``ar``) and methods, and of ``generate`` on the model carrying our
numerics.

One Spec-Bench question per category (first turn), greedy. Prints a markdown table with the CPU and dtype.
Usage: python scripts/fidelity.py [--models qwen2.5-coder-0.5b,qwen2.5-coder-1.5b] [--tokens 96]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from clasp_decoding import generate, load
from clasp_decoding.baselines import pristine_copy
from clasp_decoding.bench.run import machine_info
from clasp_decoding.text import encode_prompt

QUESTIONS = Path(__file__).resolve().parents[2] / "shared" / "data" / "spec_bench" / "question.jsonl"


def one_per_category(path: Path) -> list[str]:
    seen, out = set(), []
    for line in path.read_text().splitlines():
        q = json.loads(line)
        if q["category"] not in seen:
            seen.add(q["category"])
            out.append(q["turns"][0])
    return out


@torch.inference_mode()
def hf_greedy(model, tok, prompts: list[list[int]], n: int) -> list[list[int]]:
    """``generate`` on a batch (left-padded when lengths differ); the new tokens of each row."""
    width = max(len(p) for p in prompts)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=n,
        do_sample=False,
        top_k=None,
        top_p=None,
        temperature=None,
        pad_token_id=pad,
    )
    eos = set(
        model.generation_config.eos_token_id
        if isinstance(model.generation_config.eos_token_id, list)
        else [model.generation_config.eos_token_id]
    )
    rows = []
    for row in out[:, width:].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        rows.append(row[:cut])
    return rows


def measure(name: str, questions: list[str], n: int) -> dict:
    model, tok = load(name)
    plain = pristine_copy(model)
    prompts = [encode_prompt(tok, [{"role": "user", "content": q}]) for q in questions]
    counts = dict.fromkeys(
        ["threads", "batch_padded", "batch_same", "ar_vs_generate", "installed_vs_ar", "methods_vs_ar"], 0
    )
    for i, p in enumerate(prompts):
        torch.set_num_threads(2)
        ref = hf_greedy(plain, tok, [p], n)[0]
        torch.set_num_threads(1)
        counts["threads"] += hf_greedy(plain, tok, [p], n)[0] == ref
        torch.set_num_threads(2)
        other = prompts[(i + 1) % len(prompts)]
        counts["batch_padded"] += hf_greedy(plain, tok, [p, other], n)[0] == ref
        counts["batch_same"] += hf_greedy(plain, tok, [p, p], n)[0] == ref
        ar = generate(model, tok, p, max_new_tokens=n, method="ar").token_ids
        counts["ar_vs_generate"] += ar == ref
        counts["installed_vs_ar"] += hf_greedy(model, tok, [p], n)[0] == ar
        counts["methods_vs_ar"] += all(
            generate(model, tok, p, max_new_tokens=n, method=m).token_ids == ar for m in ("clasp", "hybrid", "pld")
        )
        print(f"  {name} q{i}: {dict(counts)}", file=sys.stderr, flush=True)
    return {"model": name, "dtype": str(model.dtype).replace("torch.", ""), "n": len(prompts), **counts}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="qwen2.5-coder-0.5b,qwen2.5-coder-1.5b")
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--questions", default=str(QUESTIONS))
    a = ap.parse_args()
    questions = one_per_category(Path(a.questions))
    info = machine_info()
    t0 = time.time()
    rows = [measure(m, questions, a.tokens) for m in a.models.split(",")]
    flags = open("/proc/cpuinfo").read()
    isa = ", ".join(f for f in ("amx_bf16", "avx512_bf16", "avx512f", "avx2") if f in flags)
    print(
        f"\n{info['cpu']} ({isa}), {info['torch_threads']} threads, torch {info['torch']}, "
        f"transformers {info['transformers']}; greedy, {a.tokens} new tokens, {len(questions)} questions "
        f"(one per Spec-Bench category, first turn); {time.time() - t0:.0f} s\n"
    )
    print(
        "| model (dtype) | generate: 1 thread = 2 threads | generate: batch of 2 (padded) = alone | "
        "generate: same prompt twice = alone | our `ar` = generate (untouched copy) | "
        "generate on the installed model = our `ar` | clasp, hybrid, pld = our `ar` |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        n = r["n"]
        cells = [
            f"{r[k]}/{n}"
            for k in ("threads", "batch_padded", "batch_same", "ar_vs_generate", "installed_vs_ar", "methods_vs_ar")
        ]
        print(f"| {r['model']} ({r['dtype']}) | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
