"""Hybrid drafting and the cost-aware controller: decisions on synthetic costs, losslessness in every mode."""

from __future__ import annotations

import itertools

import pytest
import torch

from clasp_decoding.api import runner_for
from clasp_decoding.config import GenerationConfig
from clasp_decoding.controller import EMA, Acceptance, Controller, ControllerState, Plan, expected_tokens
from clasp_decoding.decoding import decode, start_session
from conftest import ARCHS, hf_greedy, random_prompt, tiny_model
from test_sampling import STEPS, VOCAB, chi_square_pvalue, exact_distribution, sample_many


def state(tv0=1.0, tv_k=1.05, clasp_rate=None, skip=4, pld_alpha=None):
    """Synthetic estimates: plain step ``tv0`` s, verification ``tv_k`` s, layer-skip rounds that delivered
    ``clasp_rate`` tokens/s at skip count ``skip``, lookup acceptance ``pld_alpha`` for 2-gram matches."""
    s = ControllerState(num_layers=10)
    s.verify[0] = EMA(value=tv0)
    for k in range(1, 17):
        s.verify[k] = EMA(value=tv_k)
    if clasp_rate is not None:
        for _ in range(8):
            s.realize(("clasp", skip), clasp_rate * 2.0, 2.0)
    if pld_alpha is not None:
        look = s.lookup_acceptance(2)
        look.successes, look.trials = pld_alpha * 100, 100.0
    return s


def test_expected_tokens():
    assert expected_tokens(0.5, 0) == 1.0
    assert expected_tokens(0.5, 1) == pytest.approx(1.5)
    assert expected_tokens(0.5, 3) == pytest.approx(1 + 0.5 + 0.25 + 0.125)
    assert expected_tokens(1.0, 4) == 5.0


def test_plain_decoding_when_drafting_cannot_pay():
    c = Controller(state(clasp_rate=0.9), max_draft=8, candidates=[4])
    assert c.plan(4, 0, 100).source == "plain"
    # A 1% gain is within the margin: not worth the risk either.
    assert Controller(state(clasp_rate=1.01), max_draft=8, candidates=[4]).plan(4, 0, 100).source == "plain"


def test_drafts_when_it_pays_up_to_the_cap():
    c = Controller(state(clasp_rate=1.2), max_draft=8, candidates=[4])
    plan = c.plan(4, 0, 100)
    assert plan.source == "clasp" and plan.max_tokens == 8  # the draft-exiting threshold stops it earlier
    assert c.plan(4, 0, 3).max_tokens == 3  # the token budget caps it


def test_the_first_round_measures_plain_decoding_then_drafting_is_tried():
    s = ControllerState(num_layers=10)
    c = Controller(s, max_draft=6, candidates=[3, 5])
    assert c.plan(3, 0, 50).source == "plain"
    c.observe("plain", 0, 0, verify_seconds=1.0, draft_seconds=0.0, num_skip=3)
    assert c.plan(3, 0, 50).source == "clasp"  # unmeasured: try it
    for _ in range(6):  # rounds of 1 token in 4.2 s: far slower than a 1 s plain step
        c.observe("clasp", 4, 0, verify_seconds=1.05, draft_seconds=3.2, num_skip=3)
    assert s.realized_rate(("clasp", 3)) == pytest.approx(1 / 4.25, rel=1e-3)
    assert c.plan(3, 0, 50).source == "plain"


def test_layer_selection_counts_against_layer_skipping():
    s = state(clasp_rate=1.1)
    c = Controller(s, max_draft=8, candidates=[4])
    assert c.plan(4, 0, 100).source == "clasp"
    for _ in range(3):
        c.charge_selection(4, 2.0)  # DP runs that produced no tokens themselves
    assert c.plan(4, 0, 100).source == "plain"


def test_realized_rate_is_a_ratio_of_running_means():
    s = ControllerState(num_layers=10)
    for _ in range(50):
        s.realize(("clasp", 4), 5, 0.6)
        s.realize(("clasp", 4), 1, 0.3)
    # Tokens over time (6 / 0.9), not the mean of per-round rates ((8.33 + 3.33) / 2).
    assert s.realized_rate(("clasp", 4)) == pytest.approx(6 / 0.9, rel=0.1)


def test_prompt_lookup_wins_when_its_matches_are_good():
    c = Controller(state(clasp_rate=1.1, pld_alpha=0.6), max_draft=8, candidates=[4])
    plan = c.plan(4, 6, 100)
    assert plan.source == "pld" and plan.max_tokens == 6
    poor = Controller(state(clasp_rate=1.3, pld_alpha=0.05), max_draft=8, candidates=[4])
    assert poor.plan(4, 6, 100).source == "clasp"
    useless = Controller(state(clasp_rate=0.5, pld_alpha=0.02), max_draft=8, candidates=[4])
    assert useless.plan(4, 6, 100).source == "plain"  # a failed lookup round still costs t_v(k) > t_v(0)


def test_lookup_acceptance_is_kept_per_match_length():
    s = state(pld_alpha=0.02)
    c = Controller(s, max_draft=8, candidates=[4])
    for _ in range(10):
        c.observe("pld", 8, 8, verify_seconds=1.05, draft_seconds=0.0, num_skip=4, lookup_ngram=4)
    assert s.lookup_acceptance(4).alpha > 0.9 and s.lookup_acceptance(2).alpha < 0.05
    assert c.plan(4, 8, 100, lookup_ngram=4).source == "pld"
    assert c.plan(4, 8, 100, lookup_ngram=2).source != "pld"


def test_probes_now_and_then_while_decoding_plainly():
    c = Controller(state(clasp_rate=0.5), max_draft=8, candidates=[4], probe_every=5)
    sources = [c.plan(4, 0, 100).source for _ in range(10)]
    assert sources.count("clasp") == 2 and sources[4] == "clasp" and sources[9] == "clasp"
    # With a lookup match at hand, the probe is the nearly free one.
    c = Controller(state(clasp_rate=0.5, pld_alpha=0.01), max_draft=8, candidates=[4], probe_every=3)
    assert [c.plan(4, 5, 100).source for _ in range(3)] == ["plain", "plain", "pld"]


def test_skip_count_explores_then_exploits():
    s = state(clasp_rate=1.05, skip=4)
    c = Controller(s, max_draft=8, candidates=[2, 4, 6])
    assert c.choose_num_skip(4) == 2  # unexplored first
    for m, rate in ((2, 1.2), (6, 0.8)):
        for _ in range(8):
            s.realize(("clasp", m), rate, 1.0)
    assert c.choose_num_skip(4) == 2
    for _ in range(30):
        s.realize(("clasp", 2), 0.5, 1.0)  # the text changed: 2 is now the worst
    assert c.choose_num_skip(2) == 4


def test_acceptance_counts_only_tested_tokens():
    a = Acceptance(prior=0.5, weight=0.0001, decay=1.0)
    a.update(4, 4)  # four successes, none failed
    a.update(4, 1)  # one success, then one failure; the last two were never tested
    assert a.alpha == pytest.approx(5 / 6, rel=1e-3)


# ----------------------------------------------------------------------------- losslessness


def cycle_plans(monkeypatch):
    """Force the controller through every mode in turn: plain, lookup (if found), layer skip."""
    modes = itertools.cycle(["plain", "pld", "clasp"])

    def plan(self, num_skip, lookup_len, budget, lookup_ngram=2):
        mode = next(modes)
        if mode == "pld" and lookup_len:
            return Plan("pld", min(lookup_len, budget), 1.0)
        if mode == "plain" or budget <= 0:
            return Plan("plain", 0, 1.0)
        return Plan("clasp", min(3, budget), 1.0)

    monkeypatch.setattr(Controller, "plan", plan)


@pytest.mark.parametrize("arch", ARCHS)
def test_hybrid_greedy_equals_generate(arch):
    for seed in range(3):
        model = tiny_model(arch, seed=seed)
        prompt = random_prompt(500 + seed, 6) * 2  # repeated text gives prompt lookup something to find
        ref = hf_greedy(model, prompt, 40)
        for method, adaptive in (("hybrid", False), ("clasp", True)):
            cfg = GenerationConfig(
                max_new_tokens=40, method=method, adaptive=adaptive, draft_exit_threshold=0.0, layer_opt_interval=2
            )
            runner = runner_for(model)
            s = start_session(runner, prompt, cfg, set())
            out = [t for chunk in decode(runner, prompt, cfg, set(), None, s) for t in chunk]
            assert out == ref, (arch, seed, method)


@pytest.mark.parametrize("arch", ARCHS)
def test_every_mode_switch_keeps_greedy_output(arch, monkeypatch):
    cycle_plans(monkeypatch)
    model = tiny_model(arch, seed=4)
    prompt = random_prompt(600, 5) * 3
    ref = hf_greedy(model, prompt, 45)
    cfg = GenerationConfig(
        max_new_tokens=45, method="hybrid", draft_exit_threshold=0.0, layer_opt_interval=2, lookup_min_ngram=1
    )
    runner = runner_for(model)
    s = start_session(runner, prompt, cfg, set())
    out = [t for chunk in decode(runner, prompt, cfg, set(), None, s) for t in chunk]
    assert out == ref
    assert {"plain", "pld", "clasp"} <= set(s.stats.modes)


@pytest.mark.slow
@pytest.mark.parametrize("forced", [False, True])
def test_hybrid_sampling_keeps_the_distribution(monkeypatch, forced):
    if forced:
        cycle_plans(monkeypatch)
    model = tiny_model("llama", seed=8, vocab=VOCAB, layers=4)
    cfg = GenerationConfig(
        max_new_tokens=STEPS,
        method="hybrid",
        temperature=1.0,
        draft_exit_threshold=0.0,
        lookup_min_ngram=1,
        lookup_max_ngram=2,
        layer_opt_interval=1,
    )
    exact = exact_distribution(model, cfg.sampling)
    n = 3000
    counts = sample_many(model, cfg, n)
    expected = torch.tensor([exact[s] for s in itertools.product(range(VOCAB), repeat=STEPS)]) * n
    assert chi_square_pvalue(counts, expected) > 1e-3
