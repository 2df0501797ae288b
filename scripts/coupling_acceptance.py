#!/usr/bin/env python
"""How often a layer-skip draft token is accepted under speculative sampling and under position-keyed
sampling (the exponential race shared by draft and target), teacher-forced on the model's own samples.

For each position: ``p`` is the full model's warped distribution, ``q`` the layer-skip draft's (the skip
set CLaSp's DP picks on the prompt, the default quantized draft), both given the same verified context.
Speculative sampling accepts with probability ``sum_v min(p, q)``; the keyed rule accepts when the two
races, run with the same noise, pick the same token (estimated over 512 seeds per position). Prompt
lookup's one-hot drafts are accepted with probability ``p(x)`` under both rules, so only layer-skip
drafts can tell the two apart.

Usage: python scripts/coupling_acceptance.py [--model qwen2.5-coder-1.5b] [--tokens 48] [--temperatures 0.7,1.0]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from clasp_decoding import GenerationConfig, generate, load  # noqa: E402
from clasp_decoding.bench.suite import builtin_questions  # noqa: E402
from clasp_decoding.context import model_state  # noqa: E402
from clasp_decoding.draft_head import VocabSubset  # noqa: E402
from clasp_decoding.kv_cache import KVCache  # noqa: E402
from clasp_decoding.layer_select import clasp_dp  # noqa: E402
from clasp_decoding.noise import race  # noqa: E402
from clasp_decoding.quant import draft_modules, resolve, sample_layer  # noqa: E402
from clasp_decoding.sampling import SamplingParams, warp  # noqa: E402
from clasp_decoding.text import encode_prompt  # noqa: E402

SEEDS = 512


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-coder-1.5b")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--temperatures", default="0.7,1.0")
    args = ap.parse_args()
    model, tok = load(args.model, quiet=True)
    state = model_state(model)
    runner = state.runner
    cfg = GenerationConfig()
    m = cfg.num_skipped(runner.num_layers)
    quant = resolve(cfg.draft_quant, runner.device, sample_layer(runner))
    modules, head = (
        draft_modules(state, quant, VocabSubset(runner.head, cfg.draft_vocab)) if quant != "none" else (None, None)
    )
    print(f"{args.model}, {runner.dtype}, {m} of {runner.num_layers} layers skipped, draft_quant {quant}")
    print("| T | positions | speculative sampling | position-keyed (race) |\n| --- | --- | --- | --- |")
    for t in (float(x) for x in args.temperatures.split(",")):
        params = SamplingParams(t)
        spec, keyed, n = 0.0, 0.0, 0
        for i, q in enumerate(builtin_questions()[::2]):
            ids = encode_prompt(tok, q.turns[0])
            out = generate(model, tok, ids, max_new_tokens=args.tokens, method="ar", temperature=t, seed=i).token_ids
            seq = torch.tensor(ids + out)
            cache = KVCache(runner.num_layers, len(seq) + runner.scratch_slots(), runner.dtype)
            full, hidden = runner.forward(cache, seq[: len(ids)], 0, collect_hidden=True)
            p0 = len(ids) - 1
            cache.rollback(len(ids))
            skip = clasp_dp(
                hidden[:, p0],
                m,
                lambda j, s, c=cache, p=p0: runner.layer_candidates(
                    c, j - 1, s, p, None if modules is None else modules[j - 1]
                ),
            )
            keep = [j for j in range(runner.num_layers) if j not in set(skip)]
            target, _ = runner.forward(cache, seq[len(ids) :], len(ids))
            target = torch.cat([full[-1:], target])  # rows predict tokens len(ids) .. end
            for pos in range(len(ids) - 1, len(seq) - 1):
                cache.rollback(pos)
                draft, _ = runner.forward(
                    cache, seq[pos : pos + 1], pos, layers=keep, last_only=True, vocab=head, modules=modules
                )
                cache.rollback(pos)
                runner.forward(cache, seq[pos : pos + 1], pos, last_only=True)  # restore the verified slot
                p = warp(target[pos - (len(ids) - 1)][None], params)[0]
                qd = warp(draft, params)[0]
                qfull = qd if head is None else head.to_full(qd)
                spec += float(torch.minimum(p, qfull).sum())
                rows_p = torch.stack([race(p[None], s, pos + 1)[0] for s in range(SEEDS)])
                rows_q = torch.stack([race(qfull[None], s, pos + 1)[0] for s in range(SEEDS)])
                keyed += float((rows_p == rows_q).double().mean())
                n += 1
        print(f"| {t} | {n} | {spec / n:.3f} | {keyed / n:.3f} |", flush=True)


if __name__ == "__main__":
    main()
