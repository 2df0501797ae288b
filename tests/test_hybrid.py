"""Hybrid drafting and the cost-aware controller: decisions on synthetic costs, losslessness in every mode."""

from __future__ import annotations

import itertools

import pytest

from clasp_decoding.config import GenerationConfig
from clasp_decoding.drafting.base import Source
from clasp_decoding.drafting.controller import EMA, Controller, ControllerState, CopyHazard, Decision, match_bin
from clasp_decoding.drafting.lookup import NgramIndex
from conftest import ARCHS, hf_greedy, random_prompt, run_tokens, tiny_model


def state(tv0=1.0, tv_k=1.05, clasp_rate=None, skip=4, copy_rate=None, per_token=0.0):
    """Synthetic estimates: plain step ``tv0`` s, verification of ``k`` drafts ``tv_k + per_token * k`` s,
    layer-skip rounds that delivered ``clasp_rate`` tokens/s at skip count ``skip``, and lookup copies
    that continue with probability ``copy_rate`` (a dict per match bin, or one number for all)."""
    s = ControllerState()
    s.verify[0] = EMA(value=tv0)
    for k in (1, 2, 4, 8, 16, 32, 48):
        s.verify[k] = EMA(value=tv_k + per_token * k)
    if clasp_rate is not None:
        for _ in range(8):
            s.realize((Source.LAYER_SKIP, skip), clasp_rate * 2.0, 2.0)
    if copy_rate is not None:
        rates = copy_rate if isinstance(copy_rate, dict) else dict.fromkeys((1, 2, 3, 4, 5, 8, 16), copy_rate)
        for b, r in rates.items():
            s.lookup.continued[b], s.lookup.tested[b] = r * 1000, 1000.0
    return s


def test_copy_hazard_counts_only_tested_tokens_at_their_match_length():
    h = CopyHazard(prior=0.5, weight=1e-6, decay=1.0)
    h.update(match_len=2, drafted=4, accepted=1)  # token 1 (match 2) accepted, token 2 (match 3) rejected
    assert h.tested == {2: 1, 3: 1} and h.continued == {2: 1, 3: 0}  # 3, 4 never tested
    h.update(match_len=6, drafted=3, accepted=3)  # all three at matches 6, 7, 8: bins 5, 5, 8
    assert h.tested[5] == 2 and h.continued[8] == 1
    assert h.rate(2) == pytest.approx(0.99) and h.rate(3) == pytest.approx(0.0, abs=1e-5)
    assert [match_bin(n) for n in (1, 4, 5, 7, 8, 15, 16, 60)] == [1, 4, 5, 5, 8, 8, 16, 16]


def test_copy_hazard_expected_tokens():
    h = CopyHazard(prior=0.5, weight=1.0)
    assert h.expected(3, 0) == [1.0]
    assert h.expected(3, 3) == pytest.approx([1.0, 1.5, 1.75, 1.875])  # the prior: each token 1/2
    s = state(copy_rate={1: 0.2, 2: 0.5, 3: 0.5, 4: 0.5, 5: 0.9})
    # After a 1-token match the first draft is tested at match 1, the second at match 2, ...
    assert s.lookup.expected(1, 2) == pytest.approx([1.0, 1.2, 1.3], rel=1e-3)


def test_verify_time_interpolates_and_extrapolates():
    s = ControllerState()
    assert s.t_verify(3) is None
    s.verify[0], s.verify[8] = EMA(value=1.0), EMA(value=1.4)
    assert s.t_verify(4) == pytest.approx(1.2)
    assert s.t_verify(16) == pytest.approx(1.8)  # beyond the longest measured: the slope so far
    s.verify[16] = EMA(value=2.6)  # steeper past 8: the extrapolation follows the steepest slope
    assert s.t_verify(24) == pytest.approx(2.6 + 0.15 * 8)


def test_plain_decoding_when_drafting_cannot_pay():
    c = Controller(state(clasp_rate=0.9), max_draft=8, candidates=[4])
    assert c.plan(4, 0, 100).source is Source.PLAIN
    # A 1% gain is within the margin: not worth the risk either.
    assert Controller(state(clasp_rate=1.01), max_draft=8, candidates=[4]).plan(4, 0, 100).source is Source.PLAIN


def test_drafts_when_it_pays_up_to_the_cap():
    c = Controller(state(clasp_rate=1.2), max_draft=8, candidates=[4])
    plan = c.plan(4, 0, 100)
    assert plan.source is Source.LAYER_SKIP and plan.max_tokens == 8  # the draft-exiting threshold stops it earlier
    assert c.plan(4, 0, 3).max_tokens == 3  # the token budget caps it


def test_the_first_round_measures_plain_decoding_then_drafting_is_tried():
    s = ControllerState()
    c = Controller(s, max_draft=6, candidates=[3, 5])
    assert c.plan(3, 0, 50).source is Source.PLAIN
    c.observe(Source.PLAIN, 0, 0, verify_seconds=1.0, draft_seconds=0.0, num_skip=3)
    assert c.plan(3, 0, 50).source is Source.LAYER_SKIP  # unmeasured: try it
    for _ in range(6):  # rounds of 1 token in 4.2 s: far slower than a 1 s plain step
        c.observe(Source.LAYER_SKIP, 4, 0, verify_seconds=1.05, draft_seconds=3.2, num_skip=3)
    assert s.realized_rate((Source.LAYER_SKIP, 3)) == pytest.approx(1 / 4.25, rel=1e-3)
    assert c.plan(3, 0, 50).source is Source.PLAIN


def test_layer_selection_counts_against_layer_skipping():
    s = state(clasp_rate=1.1)
    c = Controller(s, max_draft=8, candidates=[4])
    assert c.plan(4, 0, 100).source is Source.LAYER_SKIP
    for _ in range(3):
        c.charge_selection(4, 2.0)  # DP runs that produced no tokens themselves
    assert c.plan(4, 0, 100).source is Source.PLAIN


def test_realized_rate_is_a_ratio_of_discounted_sums():
    s = ControllerState()
    for _ in range(50):
        s.realize((Source.LAYER_SKIP, 4), 5, 0.6)
        s.realize((Source.LAYER_SKIP, 4), 1, 0.3)
    # Tokens over time (6 / 0.9), not the mean of per-round rates ((8.33 + 3.33) / 2).
    assert s.realized_rate((Source.LAYER_SKIP, 4)) == pytest.approx(6 / 0.9, rel=0.1)


def test_prompt_lookup_wins_when_its_matches_are_good():
    c = Controller(state(clasp_rate=1.1, copy_rate=0.6), max_draft=8, candidates=[4])
    plan = c.plan(4, 6, 100, match_len=3)
    assert plan.source is Source.LOOKUP and plan.max_tokens == 6
    poor = Controller(state(clasp_rate=1.3, copy_rate=0.05), max_draft=8, candidates=[4])
    assert poor.plan(4, 6, 100, match_len=3).source is Source.LAYER_SKIP
    useless = Controller(state(clasp_rate=0.5, copy_rate=0.02), max_draft=8, candidates=[4])
    assert useless.plan(4, 6, 100, match_len=3).source is Source.PLAIN  # a failed lookup still costs t_v(k) > t_v(0)


def test_lookup_length_follows_the_match_and_the_cost_of_verifying():
    rates = {1: 0.01, 2: 0.1, 3: 0.5, 4: 0.7, 5: 0.9, 8: 0.95, 16: 0.97}
    flat = Controller(state(clasp_rate=0.5, copy_rate=rates, tv_k=1.02, per_token=0.002), max_draft=8, candidates=[4])
    long_match = flat.plan(4, 48, 100, match_len=20)
    assert long_match.source is Source.LOOKUP and long_match.max_tokens >= 32  # a repeated passage: draft far
    assert flat.plan(4, 48, 10, match_len=20).max_tokens == 10  # never past the token budget
    assert flat.plan(4, 48, 100, match_len=1).source is Source.PLAIN  # after a lone common token: nothing pays
    steep = Controller(state(clasp_rate=0.5, copy_rate=rates, tv_k=1.02, per_token=0.05), max_draft=8, candidates=[4])
    assert 0 < steep.plan(4, 48, 100, match_len=20).max_tokens < long_match.max_tokens  # costly: shorter
    # Learning: copies after 1-token matches that keep succeeding make such lookups worth drafting.
    s = state(clasp_rate=0.5, copy_rate=rates, tv_k=1.02, per_token=0.002)
    c = Controller(s, max_draft=8, candidates=[4])
    for _ in range(200):
        c.observe(Source.LOOKUP, 4, 4, verify_seconds=1.03, draft_seconds=0.0, num_skip=4, match_len=1)
    assert c.plan(4, 48, 100, match_len=1).source is Source.LOOKUP


def test_each_text_learns_its_own_copy_rates():
    """Estimates from earlier text are the prior; this text's own lookups move its estimate fast."""
    s = state(clasp_rate=0.5, copy_rate=0.6)
    c = Controller(s, max_draft=8, candidates=[4])
    assert c.copies.rate(1) == pytest.approx(0.6, abs=1e-3)
    for _ in range(12):  # here, copies after single-token matches keep failing at once
        c.observe(Source.LOOKUP, 4, 0, verify_seconds=1.03, draft_seconds=0.0, num_skip=4, match_len=1)
    assert c.copies.rate(1) < 0.2 and s.lookup.rate(1) > 0.5  # the long-run estimate moves slowly
    fresh = Controller(s, max_draft=8, candidates=[4])  # the next text starts from the long-run estimate
    assert fresh.copies.rate(1) == pytest.approx(s.lookup.rate(1))


def test_probes_now_and_then_while_decoding_plainly():
    s = state(clasp_rate=0.5)
    c = Controller(s, max_draft=8, candidates=[4], probe_every=5)
    sources = [c.plan(4, 0, 100).source for _ in range(80)]
    probes = [i + 1 for i, src in enumerate(sources) if src is Source.LAYER_SKIP]
    assert probes == [5, 15, 35, 75]  # while layer-skip probes keep losing they come ever more rarely
    assert s.skip_probe_every == 40
    c2 = Controller(s, max_draft=8, candidates=[4], probe_every=5)  # the back-off outlives a generation
    assert [c2.plan(4, 0, 100).source for _ in range(40)].count(Source.LAYER_SKIP) == 1
    # With a lookup match at hand, the probe is a short, nearly free lookup draft.
    c = Controller(state(clasp_rate=0.5, copy_rate=0.01), max_draft=8, candidates=[4], probe_every=3)
    plans = [c.plan(4, 5, 100, match_len=2) for _ in range(3)]
    assert [p.source for p in plans] == [Source.PLAIN, Source.PLAIN, Source.LOOKUP] and plans[2].max_tokens == 2


def test_skip_count_explores_then_exploits():
    s = state(clasp_rate=1.05, skip=4)
    c = Controller(s, max_draft=8, candidates=[2, 4, 6])
    assert c.choose_num_skip(4) == 2  # unexplored first
    for m, rate in ((2, 1.2), (6, 0.8)):
        for _ in range(8):
            s.realize((Source.LAYER_SKIP, m), rate, 1.0)
    assert c.choose_num_skip(4) == 2
    for _ in range(30):
        s.realize((Source.LAYER_SKIP, 2), 0.5, 1.0)  # the text changed: 2 is now the worst
    assert c.choose_num_skip(2) == 4


def test_the_hybrid_keeps_up_with_its_best_part():
    """On simulated machines and texts where layer skipping, prompt lookup, both or neither pay, the
    hybrid's tokens per second stay near the best fixed strategy's (plain, clasp alone, lookup alone)."""
    from controller_sim import SCENARIOS, compare

    ratios = {}
    for name, (machine, text) in SCENARIOS.items():
        r = compare(machine, text, seeds=range(6))
        ratios[name] = r["hybrid"] / max(r["plain"], r["clasp"], r["pld"])
    assert min(ratios.values()) >= 0.9 and sum(ratios.values()) / len(ratios) >= 0.97, ratios


def test_copy_rates_learned_on_other_text_are_dropped_within_a_few_rounds():
    """Estimates from a text where copies went on for long carry over; on a text where they fail at once,
    lookups stop within a few rounds (once: twenty rounds of nearly nothing accepted)."""
    from controller_sim import Machine, Segment, play

    machine = Machine()
    state = ControllerState()
    play("hybrid", machine, [Segment(300, p_match=0.9, match=3, copy=0.9)], state=state)
    assert state.lookup.rate(3) > 0.8
    trace: list = []
    play("hybrid", machine, [Segment(60, p_match=0.9, match=3, copy=0.02)], state=state, trace=trace)
    first = next(i for i, src in enumerate(trace) if src is not Source.LOOKUP)
    assert first <= 6, trace  # a few rounds to see it
    assert trace[first:].count(Source.LOOKUP) <= len(trace[first:]) // 8, trace  # then only probes


def test_layer_skipping_is_dropped_when_the_text_turns_against_it():
    from controller_sim import BENCH_LIKE, GOOD, POOR, Segment, play

    trace: list = []
    text = [Segment(120, p_match=0.0, accept=GOOD), Segment(120, p_match=0.0, accept=POOR)]
    play("hybrid", BENCH_LIKE, text, trace=trace)
    assert trace[20:120].count(Source.LAYER_SKIP) >= 60  # it pays: used most of the time
    assert trace[140:240].count(Source.LAYER_SKIP) <= 25  # it stopped paying: dropped, probed now and then


def test_lookup_reports_how_long_the_match_really_is():
    def lookup(tokens):
        return NgramIndex(1, 2).lookup(tokens, 4)

    assert lookup([9, 1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 4]) == ([5, 6, 7, 8], 4)  # (3, 4) extends back to 1
    assert lookup([5, 1, 7, 1]) == ([7, 1], 1)
    assert lookup([5, 6, 7]) == ([], 0)


# ----------------------------------------------------------------------------- losslessness


def cycle_plans(monkeypatch):
    """Force the controller through every mode in turn: plain, lookup (if found), layer skip."""
    modes = itertools.cycle(["plain", "pld", "clasp"])

    def plan(self, num_skip, lookup_len, budget, match_len=1, layer_skip=True, suffix_len=0, suffix_match=1):
        mode = next(modes)
        if mode == "pld" and lookup_len:
            return Decision(Source.LOOKUP, min(lookup_len, budget), 1.0)
        if mode == "plain" or budget <= 0:
            return Decision(Source.PLAIN, 0, 1.0)
        return Decision(Source.LAYER_SKIP, min(3, budget), 1.0)

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
            out, _ = run_tokens(model, prompt, cfg)
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
    out, gen = run_tokens(model, prompt, cfg)
    assert out == ref
    assert {"plain", "pld", "clasp"} <= set(gen.stats.modes), (gen.stats.modes, gen.stats.draft_lengths)


class SlowVerifyRunner:
    """A runner whose calls take ``base`` seconds per row (a draft step its share of the layers, a DP
    candidate call its one layer) on a simulated clock (:meth:`clock`, which the test puts in place of
    ``time.perf_counter``): a machine where verifying ``k`` drafts costs ``k + 1`` plain steps, as bf16 on
    CPUs without AMX nearly does. ``spent`` adds up the simulated seconds."""

    def __init__(self, runner, base: float, host=None) -> None:
        import time

        self._runner, self.base, self.spent = runner, base, 0.0
        self._host = host or time.perf_counter

    def __getattr__(self, name):
        return getattr(self._runner, name)

    def _charge(self, t0: float, seconds: float) -> None:
        self.spent += seconds

    def clock(self) -> float:
        """The simulated machine's clock: what its passes cost, plus a hundredth of the host's time (so
        that nothing measures zero), whatever else runs on the host meanwhile."""
        return self.spent + 0.01 * self._host()

    def forward(self, cache, tokens, start, **kw):
        t0 = self.spent
        out = self._runner.forward(cache, tokens, start, **kw)
        layers = kw.get("layers")
        share = 1.0 if layers is None else len(layers) / self._runner.num_layers
        self._charge(t0, self.base * tokens.shape[-1] * share)
        return out

    def layer_candidates(self, cache, index, states, position, module=None):
        t0 = self.spent
        out = self._runner.layer_candidates(cache, index, states, position, module)
        self._charge(t0, self.base * states.shape[0] / self._runner.num_layers)
        return out


def test_where_verification_costs_k_steps_the_default_decodes_plainly(monkeypatch):
    """The default method measures the costs, sees that no draft can pay, decodes plainly, and stays
    within 3% of plain decoding's time on the simulated machine (whose clock every measurement reads, so
    a loaded host changes nothing)."""
    import time

    from clasp_decoding.runner import ModelRunner
    from clasp_decoding.state import ModelState

    model = tiny_model("llama", seed=3)
    slow = SlowVerifyRunner(ModelRunner(model), base=0.04, host=time.perf_counter)
    monkeypatch.setattr(time, "perf_counter", slow.clock)
    state = ModelState(slow)
    prompt = random_prompt(31, 6) * 2  # a repeat: prompt lookup finds matches all the time

    def run(method: str):
        from clasp_decoding.decoding import Generation
        from clasp_decoding.drafting.registry import make_drafter

        cfg = GenerationConfig(max_new_tokens=40, method=method)
        gen = Generation(slow, prompt, cfg, make_drafter(cfg), model=state)
        slow.spent = 0.0
        result = gen.run()
        return result, slow.spent

    run("hybrid")  # the first generation measures the costs (once per model)
    (hybrid, hybrid_spent), (plain, plain_spent) = run("hybrid"), run("ar")
    assert hybrid.stats.modes.count("plain") >= 0.9 * len(hybrid.stats.modes), hybrid.stats.modes
    assert hybrid.token_ids == plain.token_ids
    costs = state.learned["costs"].verify
    assert costs[2] > 2.5 * costs[0]  # the measurement saw the simulated machine
    # The promise, on the simulated machine's clock: within 3% of plain decoding.
    assert hybrid_spent <= 1.03 * plain_spent, (hybrid_spent, plain_spent)


def test_free_rows_are_those_verification_takes_at_nearly_no_cost():
    s = ControllerState()
    s.verify[0], s.verify[8], s.verify[16] = EMA(value=1.0), EMA(value=1.02), EMA(value=2.0)
    c = Controller(s, max_draft=8, candidates=[4])
    assert c.free_rows(2, 16) == 6  # up to 8 drafts costs ~2% more: free; past 8 it climbs
    assert c.free_rows(2, 5) == 3  # within the budget
    assert c.free_rows(8, 16) == 0
    assert Controller(ControllerState(), max_draft=8, candidates=[4]).free_rows(2, 8) == 0  # nothing measured


def test_a_peek_past_a_draft_leaves_the_index_alone():
    idx = NgramIndex(1, 3)
    tokens = [5, 6, 7, 8, 9, 1, 2]
    assert idx.peek(tokens, [5, 6], 3) == [7, 8, 9]  # after the draft's "5 6": what followed it before
    assert idx.peek(tokens, [3], 3) == []
    assert idx.indexed == len(tokens) - 1 and (1, 2, 5) not in idx.follow  # the draft was not indexed
    assert idx.lookup(tokens + [5], 2) == ([6, 7], 1)


def test_a_copy_draft_continues_from_the_other_source_and_keeps_the_text(monkeypatch):
    """Suffix drafts that run out continue with prompt lookup and lookup drafts with the suffix index
    (here every row is free and the controller copies whatever a source found, taking the two sources
    in turn, so the test does not depend on timings measured on the machine): the text stays plain decoding's, greedy and seeded."""
    from clasp_decoding import generate
    from clasp_decoding.drafting.hybrid import HybridDrafter
    from clasp_decoding.drafting.lookup import NgramIndex as Index
    from clasp_decoding.suffix_index import SuffixIndex

    rounds = itertools.count()

    def copy_what_was_found(
        self, num_skip, lookup_len, budget, match_len=1, layer_skip=True, suffix_len=0, suffix_match=1
    ):
        if suffix_len and (next(rounds) % 2 or not lookup_len):  # both found: take them in turn
            return Decision(Source.SUFFIX, min(suffix_len, budget), 1.0)
        if lookup_len:
            return Decision(Source.LOOKUP, min(lookup_len, budget), 1.0)
        return Decision(Source.PLAIN, 0, 1.0)

    monkeypatch.setattr(Controller, "plan", copy_what_was_found)
    monkeypatch.setattr(Controller, "free_rows", lambda self, drafted, budget, slack=1.05: max(0, budget - drafted))
    peeks, continued = [], []
    real_peek, real_continued = Index.peek, HybridDrafter._continued
    monkeypatch.setattr(Index, "peek", lambda self, *a: peeks.append(real_peek(self, *a)) or peeks[-1])

    def spy(self, state, found, planned, budget, source):
        draft = real_continued(self, state, found, planned, budget, source)
        continued.append((source, len(draft.tokens) > min(len(found), planned)))
        return draft

    monkeypatch.setattr(HybridDrafter, "_continued", spy)
    model = tiny_model("qwen2", seed=5)
    prompt = random_prompt(31, 12) * 3
    for sampling in (dict(), dict(temperature=0.9, seed=3)):
        cfg = GenerationConfig(max_new_tokens=40, method="hybrid", lookup_min_ngram=1, **sampling)
        plain = generate(model, None, prompt, cfg.updated(method="ar")).token_ids
        index = SuffixIndex()
        for _ in range(3):
            assert generate(model, None, prompt, cfg, suffix_index=index).token_ids == plain, sampling
    assert any(peeks)  # suffix drafts were continued by prompt lookup
    assert (Source.SUFFIX, True) in continued and (Source.LOOKUP, True) in continued, set(continued)


def test_a_layer_selection_adds_its_time_without_counting_as_a_round():
    """The first layer selection of a model (no tokens, a DP's time) once weighed like a round of none,
    and sank layer skipping's estimate for dozens of rounds: now its seconds add to those rounds'."""
    s = state(tv0=1.0)
    c = Controller(s, max_draft=8, candidates=[4])
    c.charge_selection(4, 1.0)
    for _ in range(4):
        c.observe(Source.LAYER_SKIP, 3, 2, verify_seconds=1.05, draft_seconds=0.6, num_skip=4)
    # 3 tokens per 1.65 s round, plus the selection's 1.0 s, discounted by 0.9 per round like the rounds:
    # about 1.63 tokens/s against plain decoding's 1 (as a round of no tokens: about 0.9)
    weights = [0.9**i for i in range(4)]
    assert s.realized_rate((Source.LAYER_SKIP, 4)) == pytest.approx(3 * sum(weights) / (1.65 * sum(weights) + 0.9**4))
    assert c.plan(4, 0, 100).source is Source.LAYER_SKIP


def test_a_cost_table_from_another_hour_is_scaled_to_the_machines_speed_now():
    """Seeded costs (kept across processes) say a plain step takes 1.5 s; this process measures rounds
    1.5x faster than the table says at their lengths: every seeded figure is scaled by that, so a
    layer-skip rate that only beat the stale plain step is not taken for a gain."""
    from clasp_decoding.costs import CostTable

    s = ControllerState()
    CostTable({0: 1.5, 1: 1.53, 2: 1.56, 4: 1.62, 8: 1.8}, {}, 0).seed(s)
    assert s.t_verify(0) == pytest.approx(1.5)  # nothing measured yet: the table as it is
    c = Controller(s, max_draft=8, candidates=[4])
    for _ in range(6):  # 1 token per 1.3 s: a gain over 1/1.5 tokens/s but not over 1/1.0
        c.observe(Source.LAYER_SKIP, 2, 0, verify_seconds=1.04, draft_seconds=0.26, num_skip=4)
    assert s.t_verify(0) == pytest.approx(1.0, rel=1e-3) and s.t_verify(8) == pytest.approx(1.2, rel=1e-3)
    assert c.plan(4, 0, 100).source is Source.PLAIN
