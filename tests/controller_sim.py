"""A simulated machine and text for the hybrid's controller: costs and acceptances set by hand, rounds
played through the real :class:`~clasp_decoding.drafting.controller.Controller` the way the hybrid
drafter drives it (plan, round, observe; a layer selection every ``loi`` rounds while layer skipping is in
use), next to the fixed strategies it chooses among: plain decoding, CLaSp's layer skip alone, prompt
lookup alone. Used by tests/test_hybrid.py and scripts (tokens per simulated second)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from clasp_decoding.costs import LADDER, CostTable
from clasp_decoding.drafting.base import Source
from clasp_decoding.drafting.controller import Controller, ControllerState


@dataclass
class Machine:
    """Seconds: a plain step, each extra verified token, a draft step per skip count, a layer selection."""

    step: float = 1.0
    per_token: float = 0.03
    draft: dict[int, float] = field(default_factory=lambda: {4: 0.45, 6: 0.38, 8: 0.32, 10: 0.27})
    dp: float = 1.0

    def verify(self, k: int) -> float:
        return self.step + self.per_token * k


@dataclass
class Segment:
    """A stretch of text: layer-skip drafts accepted per token with ``accept[M]``, stopped early by the
    draft-exiting threshold with ``exit`` per token; a lookup match offered with ``p_match``, ``match``
    tokens long, whose copy continues per token with ``copy``."""

    rounds: int
    accept: dict[int, float] = field(default_factory=lambda: {4: 0.85, 6: 0.8, 8: 0.72, 10: 0.6})
    exit: float = 0.15
    p_match: float = 0.5
    match: int = 2
    copy: float = 0.3


def _geometric(rng: random.Random, p: float, cap: int) -> int:
    n = 0
    while n < cap and rng.random() < p:
        n += 1
    return n


def play(
    strategy: str,
    machine: Machine,
    text: list[Segment],
    *,
    state: ControllerState | None = None,
    seed: int = 0,
    max_draft: int = 8,
    lookup_tokens: int = 10,
    num_skip: int = 8,
    loi: int = 16,
    candidates: tuple[int, ...] = (4, 6, 8, 10),
    trace: list | None = None,
) -> float:
    """Tokens per simulated second of ``strategy`` (``plain``, ``clasp``, ``pld`` or ``hybrid``) over
    ``text``; ``state`` carries the hybrid's estimates between texts (as a model's state does); ``trace``
    receives each round's source."""
    rng = random.Random(seed)
    tokens, seconds = 0, 0.0
    controller = None
    if strategy == "hybrid":
        if state is None:  # a fresh model: estimates seeded by the measured costs, as costs.measure does
            state = ControllerState()
            table = CostTable({k: machine.verify(k) for k in LADDER}, {"none": machine.draft[num_skip]}, num_skip)
            table.seed(state)
        controller = Controller(state, max_draft=max_draft, candidates=list(candidates))
        num_skip = controller.choose_num_skip(num_skip)
    skip_rounds = 0  # layer-skip rounds since the last layer selection
    for seg in text:
        for _ in range(seg.rounds):
            found = lookup_tokens * 4 if rng.random() < seg.p_match else 0
            match = seg.match if found else 0
            if strategy == "hybrid":
                plan = controller.plan(num_skip, found, 1000, match)
                source, k = plan.source, plan.max_tokens
                num_skip = plan.num_skip if plan.num_skip is not None else num_skip
            elif strategy == "clasp":
                source, k = Source.LAYER_SKIP, max_draft
            elif strategy == "pld" and found:
                source, k = Source.LOOKUP, min(found, lookup_tokens)
            else:
                source, k = Source.PLAIN, 0
            draft_seconds = 0.0
            if source is Source.LAYER_SKIP:
                drafted = 1 + _geometric(rng, 1 - seg.exit, k - 1)
                accepted = _geometric(rng, seg.accept[num_skip], drafted)
                draft_seconds = drafted * machine.draft[num_skip]
            elif source is Source.LOOKUP:
                drafted = k
                accepted = _geometric(rng, seg.copy, drafted)
            else:
                drafted = accepted = 0
            verify_seconds = machine.verify(drafted)
            if trace is not None:
                trace.append(source)
            tokens += accepted + 1
            seconds += draft_seconds + verify_seconds
            skip_rounds += source is Source.LAYER_SKIP
            if controller is not None:
                controller.observe(source, drafted, accepted, verify_seconds, draft_seconds, num_skip, match)
            if skip_rounds >= loi:  # a layer selection every ``loi`` rounds of layer skipping
                skip_rounds = 0
                seconds += machine.dp
                if controller is not None:
                    controller.charge_selection(num_skip, machine.dp)
                    num_skip = controller.choose_num_skip(num_skip)
    return tokens / seconds


def compare(machine: Machine, text: list[Segment], seeds=range(5), **kw) -> dict[str, float]:
    """Mean tokens/s of every strategy over a few seeds (the hybrid starting fresh each time)."""
    out = {}
    for strategy in ("plain", "clasp", "pld", "hybrid"):
        out[strategy] = sum(play(strategy, machine, text, seed=s, **kw) for s in seeds) / len(seeds)
    return out


GOOD = {4: 0.9, 6: 0.87, 8: 0.83, 10: 0.75}
POOR = {4: 0.5, 6: 0.4, 8: 0.3, 10: 0.2}
BENCH_LIKE = Machine(per_token=0.05, draft={4: 0.45, 6: 0.4, 8: 0.36, 10: 0.32})
SCENARIOS = {
    "layer skip barely pays, copies fail": (Machine(), [Segment(300, p_match=0.6, match=2, copy=0.1)]),
    "copying text": (Machine(), [Segment(300, p_match=0.9, match=12, copy=0.92, accept=POOR)]),
    "verifying k costs k steps": (Machine(per_token=1.0), [Segment(300)]),
    "copying, then not": (
        Machine(),
        [Segment(100, p_match=0.9, match=12, copy=0.92), Segment(200, p_match=0.5, match=1, copy=0.05)],
    ),
    "expensive drafts": (Machine(draft={4: 0.8, 6: 0.75, 8: 0.7, 10: 0.65}), [Segment(300, p_match=0.3, match=3)]),
    "layer skip pays, no copies": (BENCH_LIKE, [Segment(300, p_match=0.5, match=1, copy=0.05, accept=GOOD)]),
    "both pay": (BENCH_LIKE, [Segment(300, p_match=0.5, match=3, copy=0.5, accept=GOOD)]),
    "layer skip pays, then not": (
        BENCH_LIKE,
        [
            Segment(150, p_match=0.5, match=1, copy=0.05, accept=GOOD),
            Segment(150, p_match=0.5, match=1, copy=0.05, accept=POOR),
        ],
    ),
}
"""Machines and texts where each part of the hybrid (or neither) is the one to use."""
