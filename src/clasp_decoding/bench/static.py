"""The ``static`` baseline: one skip set per model, chosen offline (Self-SD style) and cached.

Self-SD searches skip sets by Bayesian optimisation on calibration data. Here the search is a small
measured local search, which needs no extra dependency and keeps the objective honest: each candidate is
scored by the tokens per second it actually achieves on a few calibration prompts (greedy, in the
engine). Candidates start from CLaSp's DP on a calibration prompt and from every-other-middle-layer sets
at several sizes, then the best is improved by swapping single layers. The result and the time the
search took are cached per model, dtype and settings under the cache directory.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from dataclasses import asdict, dataclass

import torch

from ..api import generate
from ..config import GenerationConfig
from ..context import runner_for
from ..fetch import cache_dir
from ..layer_select import clasp_dp, every_other_middle
from ..text import encode_prompt

CALIBRATION = (
    "Describe how a bicycle works to a ten-year-old.",
    "Sarah has 3 boxes with 12 pencils each. She gives away 9 pencils. How many are left? Explain.",
    "Rewrite this sentence in the passive voice: The committee approved the new budget on Monday.",
)


@dataclass
class StaticSearch:
    skip_layers: tuple[int, ...]
    tokens_per_second: float
    search_seconds: float
    evaluations: int
    tried: list

    def to_dict(self) -> dict:
        d = asdict(self)
        d["skip_layers"] = list(self.skip_layers)
        return d


def _key(model, base: GenerationConfig, max_new_tokens: int, budget: int) -> str:
    ident = json.dumps(
        [
            "v2",
            getattr(model.config, "_name_or_path", ""),
            str(model.dtype),
            model.config.num_hidden_layers,
            base.draft_exit_threshold,
            base.max_draft_tokens,
            base.draft_vocab,
            max_new_tokens,
            budget,
        ],
    )
    return hashlib.sha256(ident.encode()).hexdigest()[:16]


def _score(model, tokenizer, base: GenerationConfig, skip: tuple[int, ...], prompts, max_new_tokens: int) -> float:
    tokens, seconds = 0, 0.0
    for ids in prompts:
        res = generate(
            model,
            tokenizer,
            ids,
            base,
            method="static",
            skip_layers=skip,
            max_new_tokens=max_new_tokens,
            temperature=0.0,
        )
        tokens += res.stats.new_tokens
        seconds += res.stats.time_total
    return tokens / seconds if seconds else 0.0


def find_static_skip(
    model,
    tokenizer,
    base: GenerationConfig | None = None,
    *,
    max_new_tokens: int = 32,
    budget: int = 14,
    seed: int = 0,
    use_cache: bool = True,
    progress=None,
) -> StaticSearch:
    """Search a fixed skip set maximising measured tokens/s on the calibration prompts."""
    base = base or GenerationConfig()
    path = cache_dir() / "static" / f"{_key(model, base, max_new_tokens, budget)}.json"
    if use_cache and path.is_file():
        d = json.loads(path.read_text())
        return StaticSearch(
            tuple(d["skip_layers"]), d["tokens_per_second"], d["search_seconds"], d["evaluations"], d["tried"]
        )
    t0 = time.perf_counter()
    runner = runner_for(model)
    num_layers = runner.num_layers
    prompts = [encode_prompt(tokenizer, p) for p in CALIBRATION]
    generate(model, tokenizer, prompts[0], base, method="ar", max_new_tokens=4)  # warm-up
    ids = torch.tensor(prompts[0], device=runner.device)
    cache = runner.new_cache(len(ids), 1)
    _, hidden = runner.forward(cache, ids, 0, last_only=True, collect_hidden=True)
    cache.rollback(len(ids))
    pos = len(ids) - 1
    candidates: list[tuple[int, ...]] = []
    for ratio in (0.2, 0.3, 0.4, 0.5):
        m = max(1, round(ratio * num_layers))
        candidates.append(clasp_dp(hidden[:, 0], m, lambda i, s: runner.layer_candidates(cache, i - 1, s, pos)))
        candidates.append(every_other_middle(num_layers, m))
    runner.release_cache(cache)
    tried: dict[tuple[int, ...], float] = {}

    def evaluate(skip: tuple[int, ...]) -> float:
        if skip not in tried:
            tried[skip] = _score(model, tokenizer, base, skip, prompts, max_new_tokens)
            if progress:
                progress(len(tried), budget, skip, tried[skip])
        return tried[skip]

    for c in candidates[:budget]:
        evaluate(c)
    rng = random.Random(seed)
    attempts = 0
    while len(tried) < budget and attempts < 20 * budget:
        attempts += 1
        best = max(tried, key=tried.get)
        inside = list(best)
        outside = [i for i in range(num_layers) if i not in best]
        if not inside or not outside:
            break
        swap = set(best) - {rng.choice(inside)} | {rng.choice(outside)}
        evaluate(tuple(sorted(swap)))
    best = max(tried, key=tried.get)
    result = StaticSearch(
        best, tried[best], time.perf_counter() - t0, len(tried), [[list(k), round(v, 3)] for k, v in tried.items()]
    )
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result.to_dict(), indent=1))
    return result
