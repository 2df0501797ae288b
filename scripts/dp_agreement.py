#!/usr/bin/env python
"""Teacher-forced draft agreement of skip sets: how often the draft's next token equals the full model's.

For each prompt (one per Spec-Bench task) the full model generates greedily; then, at every generated
position, the draft with skip set S predicts the next token from the full model's KV cache of the
prefix (exactly the situation of a first draft step in CLaSp). Skip sets compared, at several sizes M:

- ``dp16``: CLaSp's DP, re-run every 16 tokens on the hidden states of the current token;
- ``dp_once``: the DP run once, at the end of the prompt;
- ``every_other``: every other layer, centred on the middle of the stack;
- ``random``: a random set (fixed seed).

Usage: python scripts/dp_agreement.py --model qwen2.5-coder-1.5b --skips 8,11,14 --tokens 64
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from clasp_decoding import load  # noqa: E402
from clasp_decoding.api import eos_ids_of  # noqa: E402
from clasp_decoding.baselines import hf_generate  # noqa: E402
from clasp_decoding.bench.suite import TASKS, load_questions, select  # noqa: E402
from clasp_decoding.config import GenerationConfig  # noqa: E402
from clasp_decoding.context import runner_for  # noqa: E402
from clasp_decoding.kv_cache import KVCache  # noqa: E402
from clasp_decoding.layer_select import clasp_dp, every_other_middle  # noqa: E402
from clasp_decoding.text import encode_prompt  # noqa: E402


def agreement(runner, seq: list[int], prompt_len: int, skips: dict[int, tuple[int, ...]]) -> float:
    """``skips`` maps a position to the skip set in force there (the latest key at or before it)."""
    L = runner.num_layers
    ids = torch.tensor(seq)
    cache = KVCache(runner.num_layers, len(seq) + L + 2, runner.dtype)
    runner.forward(cache, ids, 0)  # the full model's K/V for every position
    keys = sorted(skips)
    hits = 0
    # Backwards: a draft step at t writes slot t only, and later steps read slots below t.
    for t in range(len(seq) - 2, prompt_len - 2, -1):
        skip = skips[max(k for k in keys if k <= t)] if any(k <= t for k in keys) else skips[keys[0]]
        keep = [i for i in range(L) if i not in set(skip)]
        logits, _ = runner.forward(cache, ids[t : t + 1], t, layers=keep, last_only=True)
        hits += int(logits.argmax()) == seq[t + 1]
    return hits / (len(seq) - prompt_len)


def dp_sets(runner, seq: list[int], positions: list[int], m: int) -> dict[int, tuple[int, ...]]:
    ids = torch.tensor(seq)
    cache = KVCache(runner.num_layers, len(seq) + runner.num_layers + 2, runner.dtype)
    _, hidden = runner.forward(cache, ids, 0, collect_hidden=True)
    out = {}
    for p in sorted(positions, reverse=True):  # a DP at p reads slots < p and writes scratch above p
        out[p] = clasp_dp(hidden[:, p], m, lambda i, s, p=p: runner.layer_candidates(cache, i - 1, s, p))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-1.5b")
    ap.add_argument(
        "--questions", default=str(Path(__file__).resolve().parents[2] / "shared/data/spec_bench/question.jsonl")
    )
    ap.add_argument("--skips", default="8,11,14")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--per-task", type=int, default=1)
    a = ap.parse_args()
    model, tok = load(a.model)
    runner = runner_for(model)
    L = runner.num_layers
    questions = select(load_questions(a.questions), a.per_task, list(TASKS))
    rows = {}
    rng = random.Random(0)
    for m in (int(x) for x in a.skips.split(",")):
        scores: dict[str, list[float]] = {"dp16": [], "dp_once": [], "every_other": [], "random": []}
        for q in questions:
            prompt = encode_prompt(tok, q.turns[0])
            gen, _ = hf_generate(model, tok, prompt, GenerationConfig(max_new_tokens=a.tokens), eos_ids_of(model, tok))
            seq = prompt + gen
            p0 = len(prompt) - 1
            checkpoints = list(range(p0, len(seq) - 1, 16))
            dynamic = dp_sets(runner, seq, checkpoints, m)
            scores["dp16"].append(agreement(runner, seq, len(prompt), dynamic))
            scores["dp_once"].append(agreement(runner, seq, len(prompt), {p0: dynamic[p0]}))
            scores["every_other"].append(agreement(runner, seq, len(prompt), {p0: every_other_middle(L, m)}))
            scores["random"].append(agreement(runner, seq, len(prompt), {p0: tuple(sorted(rng.sample(range(L), m)))}))
        rows[m] = {k: round(sum(v) / len(v), 3) for k, v in scores.items()}
        print(f"M={m:2d} of {L}: " + "  ".join(f"{k} {v:.3f}" for k, v in rows[m].items()), flush=True)
    print(json.dumps({"model": a.model, "layers": L, "prompts": len(questions), "tokens": a.tokens, "agreement": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
