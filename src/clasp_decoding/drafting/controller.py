"""Cost-aware control: per round, draft from the source with the best expected tokens per second, as
far as pays, or not at all when plain decoding is faster.

It keeps estimates of what it measures online:

- the verification time for each number of verified tokens (``t_v(k)``; ``t_v(0)`` is a plain step),
  interpolated between the lengths measured so far,
- the tokens and seconds of layer-skip rounds for each skip count ``M`` (layer selection included),
- how likely a prompt-lookup copy continues, per length of the match it extends (:class:`CopyHazard`).

Each round it compares the expected tokens per second of its options with plain decoding's
``1 / t_v(0)`` (with a 2% margin):

- prompt lookup, when the context offers a match of ``m`` tokens: for each draft length ``k`` the
  expected tokens ``1 + sum_j P(first j accepted)`` over ``t_v(k)`` (a lookup costs nothing), and the
  best ``k``. Where verifying more tokens is nearly free (a forward pass bound by reading the weights)
  and the match is long, it drafts far (tens of tokens into a repeated passage); after a lone common
  token it drafts little or nothing;
- the layer-skip draft at skip count ``M``: the tokens per second such rounds actually delivered
  (discounted sums of tokens and of seconds), since the draft-exiting threshold makes their length
  vary. It drafts up to ``max_draft_tokens`` and stops at the first unconfident token; a skip count
  with too few rounds yet is assumed 1.5 times as fast as plain decoding, so that it is tried unless
  prompt lookup promises more.

Within a generation it also tracks what each option really delivered *here* (:class:`Measured`: tokens
over seconds of this text's recent rounds of layer skipping at ``M``, and of lookups per match-length
bin), and trusts that over the estimates carried from earlier text as soon as it has a few rounds of
it: an option that loses on this text is dropped within a few rounds, whatever it did before. Other skip
counts are explored only while layer skipping is competitive at all.

When drafting cannot pay it decodes plainly, and probes now and then so that a change in the text is
noticed: a short lookup draft every ``probe_every`` plain rounds when there is a match, otherwise a
layer-skip round, at intervals that double while such probes keep losing. The skip count ``M`` is
chosen the same way at each layer selection, among a few candidates, unexplored ones first.

The estimates are kept per model (in its :class:`~..state.ModelState`), one set per sampling setting,
and carry over between generations: they describe the machine, the model and the kind of decoding, not
one request, and they only ever change speed, never output (greedy verification and position-keyed
sampling emit the same tokens whatever was drafted; speculative sampling keeps the distribution).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from ..costs import EMA
from .base import Source

PAY_MARGIN = 1.05
"""Drafting is considered at all only if, with every draft accepted, it would beat plain decoding by this
factor: below it, timing noise decides, and probing costs more than it can find."""

LENGTH_LADDER = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
"""Lookup draft lengths the controller chooses among (plus the whole match when it is shorter): few
enough that each gets its verification time measured."""

FREE_ROWS_MAX = 16
"""The most tokens a copy draft is continued by (a tile's height: beyond it rows are never free)."""


def match_bin(length: int) -> int:
    """Bins of match length for :class:`CopyHazard`: 1-4 exactly, then 5-7, 8-15, 16 and more."""
    return length if length <= 4 else 5 if length < 8 else 8 if length < 16 else 16


class CopyHazard:
    """How likely a prompt-lookup copy goes on, as a function of how long the match already is.

    A lookup draft copies what followed an earlier occurrence of the context's last ``m`` tokens; its
    ``j``-th token is tested only if the first ``j - 1`` were accepted, and by then the match is
    ``m + j - 1`` tokens long. So each round gives, per tested token, one trial of "the copy continued
    at match length ``m + j - 1``". Long matches (a passage being repeated) continue far more often
    than 1-token ones: a per-length estimate lets one rule draft 40 tokens into a repeated passage and
    none after a lone common token. Counts decay so that recent text weighs more; a prior keeps
    unseen lengths tried."""

    def __init__(
        self, prior: float = 0.5, weight: float = 2.0, decay: float = 0.98, base: CopyHazard | None = None
    ) -> None:
        self.prior, self.weight, self.decay, self.base = prior, weight, decay, base
        self.continued: dict[int, float] = {}
        self.tested: dict[int, float] = {}

    def rate(self, length: int) -> float:
        """Probability that the copy's next token is accepted when the match is ``length`` tokens long.
        With a ``base`` (the estimate over earlier text), that is the prior for this text's own counts."""
        b = match_bin(length)
        prior = self.base.rate(length) if self.base is not None else self.prior
        hits = self.continued.get(b, 0.0) + prior * self.weight
        return min(0.99, hits / (self.tested.get(b, 0.0) + self.weight))

    def update(self, match_len: int, drafted: int, accepted: int) -> None:
        """One round: ``accepted`` of ``drafted`` lookup tokens after a match of ``match_len`` tokens."""
        if drafted <= 0:
            return
        for j in range(min(accepted + 1, drafted)):  # tokens after the first rejection were never tested
            b = match_bin(match_len + j)
            self.tested[b] = self.decay * self.tested.get(b, 0.0) + 1
            self.continued[b] = self.decay * self.continued.get(b, 0.0) + (1 if j < accepted else 0)
        if self.base is not None:
            self.base.update(match_len, drafted, accepted)

    def expected(self, match_len: int, k: int) -> list[float]:
        """Expected tokens of a round drafting ``0 .. k`` lookup tokens (the target's own token included)."""
        out, survive = [1.0], 1.0
        for j in range(k):
            survive *= self.rate(match_len + j)
            out.append(out[-1] + survive)
        return out


class Measured:
    """What rounds of one option delivered on this text: tokens over seconds, both summed with older rounds
    discounted by ``decay`` per round (so the ratio follows the text within a few rounds), and how many
    rounds were seen. Time that served the option without being a round of it (a layer selection) adds
    to its seconds."""

    def __init__(self, decay: float = 0.9) -> None:
        self.decay, self.tokens, self.seconds, self.rounds = decay, 0.0, 0.0, 0
        self.last = 0  # the controller's round count when this option last ran

    def add(self, tokens: float, seconds: float, now: int = 0) -> None:
        self.tokens = self.decay * self.tokens + tokens
        self.seconds = self.decay * self.seconds + seconds
        self.rounds += 1
        self.last = now

    def charge(self, seconds: float) -> None:
        self.seconds += seconds

    def rate(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


LOCAL_ROUNDS = 3
"""Rounds of an option on this text after which its measured rate counts (blended with the estimate)."""
LOCAL_WEIGHT = 2.0
"""How many rounds the estimate from earlier text (or, untried, the hope of exploring) is worth against
this text's measured rounds."""
STALE = 0.92
"""Per round an option does not run, what its measurement's weight keeps: a measurement that made the
controller drop an option fades, so the option is tried again after a while (the text may have moved)."""


@dataclass
class Decision:
    """A round's decision: draft up to ``max_tokens`` from ``source``, expecting ``rate`` tokens/s; a
    layer-skip draft at skip count ``num_skip`` (``None``: the drafter's current one)."""

    source: Source
    max_tokens: int
    rate: float
    num_skip: int | None = None


@dataclass
class ControllerState:
    """What the controller knows about one model on one machine."""

    verify: dict[int, EMA] = field(default_factory=dict)  # measured on this text's machine, in this process
    seed_verify: dict[int, float] = field(default_factory=dict)  # from a cost table, maybe another hour's
    lookup: CopyHazard = field(default_factory=CopyHazard)
    suffix: CopyHazard = field(default_factory=CopyHazard)  # the suffix index's drafts, by n-gram order
    skip_sets: dict[int, tuple[int, ...]] = field(default_factory=dict)  # the last DP result per skip count
    realized: dict[tuple, Measured] = field(default_factory=dict)
    skip_probe_every: int = 0  # plain rounds between layer-skip probes; doubles while probes lose
    draft_step: dict[int, EMA] = field(default_factory=dict)  # seconds of one draft step per skip count

    def realize(self, key: tuple, tokens: int, seconds: float) -> None:
        """One round of kind ``key`` (``(Source.LAYER_SKIP, M)``): ``tokens`` emitted in ``seconds``."""
        self.realized.setdefault(key, Measured()).add(tokens, seconds)

    def charge(self, key: tuple, seconds: float) -> None:
        """Time that served rounds of kind ``key`` without being one (a layer selection): it adds to their
        seconds, not to their count (as a round of no tokens it would weigh like any round, and the first
        selection of a model would pull the estimate down for dozens of rounds)."""
        self.realized.setdefault(key, Measured()).charge(seconds)

    def realized_rate(self, key: tuple, min_rounds: int = 4) -> float | None:
        """Tokens per second that rounds of this kind actually delivered: discounted sums of tokens over
        seconds (a mean of per-round rates would undervalue the long, productive rounds), so recent text
        weighs more; it includes what the model of the rate leaves out (early exits, varying draft
        lengths, layer selections). ``None`` before ``min_rounds`` rounds."""
        seen = self.realized.get(key)
        if seen is None or seen.rounds < min_rounds:
            return None
        return seen.rate() if seen.seconds else None

    def _verify_known(self) -> list[tuple[int, float]]:
        """``(drafts, seconds)`` for every length known: measured here, else the cost table's figure scaled
        by how fast the machine runs now against then (the median ratio, over the lengths measured here,
        of the measurement to the table's figure at that length). A cost table is kept across processes
        and the same machine's speed drifts (by 40% between hours on shared hosts): unscaled, a stale
        plain step makes drafting look better or worse than it is for as long as no plain round
        refreshes it, which in a drafting stretch is never."""
        fresh = {n: e.value for n, e in self.verify.items() if e.value is not None}
        if self.seed_verify:
            seeded = sorted(self.seed_verify.items())
            ratios = sorted(t / then for n, t in fresh.items() if (then := _interpolate(seeded, n)) > 0)
            scale = ratios[len(ratios) // 2] if ratios else 1.0
            for n, t in seeded:
                fresh.setdefault(n, t * scale)
        return sorted(fresh.items())

    def t_verify(self, k: int) -> float | None:
        """Verification time for ``k`` drafts: measured, else interpolated between the nearest measured
        lengths, else extrapolated from the longest one at the steepest slope seen so far (at least the
        average slope from a plain step). Optimistic while little is known, so longer drafts get tried
        and measured."""
        known = self._verify_known()
        return _interpolate(known, k) if known else None


def _interpolate(known: list[tuple[int, float]], k: int) -> float:
    """The value at ``k`` of the points ``known`` (sorted by length): linear between neighbours, the first
    below them, beyond the last at the steepest slope seen (at least the average from the first)."""
    for (n0, t0), (n1, t1) in itertools.pairwise(known):
        if n0 <= k <= n1:
            return t0 + (t1 - t0) * (k - n0) / (n1 - n0)
    if k < known[0][0]:
        return known[0][1]
    (n0, t0), (n1, t1) = known[0], known[-1]
    slope = (t1 - t0) / (n1 - n0) if n1 > n0 else 0.0
    if len(known) > 1:
        slope = max(slope, (t1 - known[-2][1]) / (n1 - known[-2][0]))
    return t1 + max(0.0, slope) * (k - n1)


class Controller:
    """Decides each round's draft source and length, and the skip count at each layer selection."""

    def __init__(
        self,
        state: ControllerState,
        *,
        max_draft: int,
        candidates: list[int],
        probe_every: int = 12,
        margin: float = 1.02,
        layer_skip: bool = True,
        local_weight: float = 2.0,
    ) -> None:
        self.state = state
        self.max_draft = max_draft
        self.candidates = sorted(set(candidates))
        self.probe_every = probe_every
        self.margin = margin
        self.layer_skip = layer_skip
        self.explore_gain = 1.5
        self.plain_streak = 0
        # This text's own copy statistics, starting from (and feeding) those of earlier text.
        self.copies = CopyHazard(weight=local_weight, decay=1.0, base=state.lookup)
        self.suffix_copies = CopyHazard(weight=local_weight, decay=1.0, base=state.suffix)
        self.local: dict[tuple, Measured] = {}  # this text's measured options
        self.rounds = 0
        self.last = Source.PLAIN  # the source the last plan chose
        if not state.skip_probe_every:
            state.skip_probe_every = probe_every

    def _blend(self, key: tuple, estimate: float) -> float:
        """The estimate, moved towards what this text measured for ``key`` once it has a few rounds (the
        more rounds, and the more recent, the further)."""
        seen = self.local.get(key)
        if seen is None or seen.rounds < LOCAL_ROUNDS:
            return estimate
        n = min(seen.rounds, 8) * STALE ** (self.rounds - seen.last)
        return (n * seen.rate() + LOCAL_WEIGHT * estimate) / (n + LOCAL_WEIGHT)

    def could_pay(self, source: Source, num_skip: int, budget: int) -> bool:
        """Whether drafting from ``source`` could beat plain decoding at all, were every drafted token
        accepted, by the costs measured so far (unmeasured lengths are extrapolated). Where verifying
        ``k`` tokens costs ``k + 1`` plain steps, nothing can: then the controller neither drafts nor
        probes, and decoding is plain."""
        s = self.state
        t0 = s.t_verify(0)
        if t0 is None:
            return True
        step = s.draft_step.get(num_skip) if source is Source.LAYER_SKIP else None
        per_draft = step.value if step is not None and step.value is not None else 0.0
        limit = min(budget, self.max_draft if source is Source.LAYER_SKIP else LENGTH_LADDER[-1])
        for k in sorted({n for n in LENGTH_LADDER if n < limit} | {limit}):
            if k > 0 and (k + 1) / (s.t_verify(k) + k * per_draft) > PAY_MARGIN / t0:
                return True
        return False

    def clasp_rate(self, num_skip: int, budget: int) -> tuple[int, float]:
        """Draft length and expected tokens/s for layer skipping at ``num_skip``.

        The length is the cap (``max_draft_tokens``, the budget): within it the draft-exiting threshold
        stops the draft at the first unconfident token, which is a sharper per-token decision than any
        length fixed in advance. The rate is what such rounds really delivered (a ratio of discounted sums
        of tokens and seconds, early exits included); a skip count without enough rounds yet is tried,
        unless the measured costs show it could not pay even if every draft were accepted."""
        k = min(self.max_draft, budget)
        key = (Source.LAYER_SKIP, num_skip)
        seen = self.state.realized_rate(key)
        if seen is None:
            if not self.could_pay(Source.LAYER_SKIP, num_skip, budget):
                return k, 0.0
            t0 = self.state.t_verify(0)  # untried: assume it beats plain decoding by half, so it gets tried
            seen = (self.explore_gain / t0) if t0 else float("inf")
        return k, self._blend(key, seen)

    def lookup_plan(self, match_len: int, found: int, budget: int, source: Source = Source.LOOKUP) -> Decision:
        """The length of a copied draft (prompt lookup, or the suffix index's) with the best expected
        tokens per second (0: none pays)."""
        s = self.state
        limit = min(found, budget)
        hazard = self.suffix_copies if source is Source.SUFFIX else self.copies
        expected = hazard.expected(match_len, limit)
        best = Decision(source, 0, 0.0)
        for k in sorted({n for n in LENGTH_LADDER if n < limit} | {limit}):
            tv = s.t_verify(k)
            rate = expected[k] / tv if tv else float("inf")
            if rate > best.rate:
                best = Decision(source, k, rate)
        if best.max_tokens:  # what such drafts after matches of this length really delivered on this text
            best.rate = self._blend((source, match_bin(match_len)), best.rate)
        return best

    def plan(
        self,
        num_skip: int,
        lookup_len: int,
        budget: int,
        match_len: int = 1,
        layer_skip: bool = True,
        suffix_len: int = 0,
        suffix_match: int = 1,
    ) -> Decision:
        """This round: draft from prompt lookup (when it found ``lookup_len`` continuation tokens after a
        match of ``match_len`` tokens), from the suffix index (``suffix_len`` tokens after an n-gram of
        ``suffix_match``), from the layer-skip draft (unless ``layer_skip`` is false: the round shares its
        forward pass with a batch), or not at all, whichever promises the most tokens per second."""
        s = self.state
        layer_skip = layer_skip and self.layer_skip
        t0 = s.t_verify(0)
        if budget <= 0 or t0 is None:  # the first round is plain: it measures the reference
            return Decision(Source.PLAIN, 0, 0.0)
        plain = 1.0 / t0
        options = []
        if lookup_len > 0:
            look = self.lookup_plan(match_len, lookup_len, budget)
            if look.max_tokens > 0:
                options.append(look)
        if suffix_len > 0:
            look = self.lookup_plan(suffix_match, suffix_len, budget, Source.SUFFIX)
            if look.max_tokens > 0:
                options.append(look)
        if layer_skip:
            m, k, rate = self.best_skip(num_skip, budget)
            options.append(Decision(Source.LAYER_SKIP, k, rate, m))
        best = max(options, key=lambda p: p.rate, default=Decision(Source.PLAIN, 0, plain))
        # The margin guards switching into drafting on noise; a source in use stays while it beats plain.
        if best.rate > plain * (1.0 if best.source is self.last else self.margin):
            self.last = best.source
            self.plain_streak = 0
            if best.source is Source.LAYER_SKIP:
                s.skip_probe_every = self.probe_every
            return best
        self.last = Source.PLAIN
        self.plain_streak += 1
        if suffix_len > 0 and self.plain_streak % self.probe_every == self.probe_every // 2:
            if self.could_pay(Source.SUFFIX, num_skip, min(suffix_len, budget)):
                return Decision(Source.SUFFIX, min(suffix_len, budget, 2), best.rate)
        probe_lookup = lookup_len > 0 and self.plain_streak % self.probe_every == 0
        if probe_lookup and self.could_pay(Source.LOOKUP, num_skip, min(lookup_len, budget)):
            # Look again, cheaply: a short lookup draft refreshes the estimate for this match length.
            return Decision(Source.LOOKUP, min(lookup_len, budget, 2), best.rate)
        if (
            layer_skip
            and self.plain_streak >= s.skip_probe_every
            and self.could_pay(Source.LAYER_SKIP, num_skip, budget)
        ):
            # A probe is a real round (same cap), so that its measured rate means what it says; while
            # probes keep losing they come ever more rarely.
            self.plain_streak = 0
            s.skip_probe_every = min(8 * self.probe_every, 2 * s.skip_probe_every)
            m = self.best_skip(num_skip, budget)[0]
            return Decision(Source.LAYER_SKIP, min(self.max_draft, budget), best.rate, m)
        return Decision(Source.PLAIN, 0, plain)

    def free_rows(self, drafted: int, budget: int, slack: float = 1.05) -> int:
        """How many draft tokens could follow ``drafted`` (within ``budget`` in all) at nearly no cost: the
        verification of the longer draft measured or interpolated within ``slack`` of the shorter's (on
        CPUs with matrix units, rows up to the tile height; elsewhere usually none)."""
        s = self.state
        base = s.t_verify(drafted)
        extra = 0
        while base is not None and drafted + extra < budget and extra < FREE_ROWS_MAX:
            longer = s.t_verify(drafted + extra + 1)
            if longer is None or longer > slack * base:
                break
            extra += 1
        return extra

    def _tried(self, m: int) -> bool:
        key = (Source.LAYER_SKIP, m)
        local = self.local.get(key)
        return self.state.realized_rate(key) is not None or (local is not None and local.rounds >= LOCAL_ROUNDS)

    def skip_options(self, current: int) -> list[int]:
        """Skip counts worth drafting at now: the current one, every one tried, and one untried while layer
        skipping is competitive with plain decoding (95% of its rate or better; where it loses at one skip
        count, trying the others costs more than it can find)."""
        t0 = self.state.t_verify(0)
        tried = [m for m in self.candidates if self._tried(m)]
        options = {current, *tried}
        if t0 is not None and tried:
            best = max(self.clasp_rate(m, self.max_draft)[1] for m in tried)
            fresh = [m for m in self.candidates if m not in options]
            if best >= 0.95 / t0 and fresh:
                options.add(fresh[0])
        return sorted(options)

    def best_skip(self, current: int, budget: int) -> tuple[int, int, float]:
        """``(num_skip, draft length, expected tokens/s)`` of the best layer-skip option now."""
        scored = [(*self.clasp_rate(m, budget), m) for m in self.skip_options(current)]
        k, rate, m = max(scored, key=lambda x: (x[1], x[2] == current))
        return m, k, rate

    def choose_num_skip(self, current: int) -> int:
        """The skip count for the next stretch (see :meth:`skip_options`)."""
        if self.state.t_verify(0) is None:
            return current
        return self.best_skip(current, self.max_draft)[0]

    def charge_selection(self, num_skip: int, seconds: float) -> None:
        """Layer selection serves the layer-skip draft: its cost counts against that draft's rate."""
        self.state.charge((Source.LAYER_SKIP, num_skip), seconds)
        self.local.setdefault((Source.LAYER_SKIP, num_skip), Measured()).charge(seconds)

    def observe(
        self,
        source: Source,
        drafted: int,
        accepted: int,
        verify_seconds: float,
        draft_seconds: float,
        num_skip: int,
        match_len: int = 1,
    ) -> None:
        s = self.state
        self.rounds += 1
        if verify_seconds is None:  # a pass shared with a batch: acceptance is this text's, the time is not
            if source in (Source.LOOKUP, Source.SUFFIX) and drafted:
                (self.suffix_copies if source is Source.SUFFIX else self.copies).update(match_len, drafted, accepted)
            return
        s.verify.setdefault(drafted, EMA()).update(verify_seconds)
        seconds = draft_seconds + verify_seconds
        if source is Source.LAYER_SKIP and drafted:
            s.realize((Source.LAYER_SKIP, num_skip), accepted + 1, seconds)
            s.draft_step.setdefault(num_skip, EMA()).update(draft_seconds / drafted)
            self.local.setdefault((Source.LAYER_SKIP, num_skip), Measured()).add(accepted + 1, seconds, self.rounds)
        elif source in (Source.LOOKUP, Source.SUFFIX) and drafted:
            hazard = self.suffix_copies if source is Source.SUFFIX else self.copies
            hazard.update(match_len, drafted, accepted)
            self.local.setdefault((source, match_bin(match_len)), Measured()).add(accepted + 1, seconds, self.rounds)
