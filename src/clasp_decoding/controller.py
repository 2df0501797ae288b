"""Cost-aware control: per round, draft from the source with the best expected tokens per second, as
far as pays, or not at all when plain decoding is faster.

It keeps exponentially weighted estimates of what it measures online:

- the verification time for each number of verified tokens (``t_v(k)``; ``t_v(0)`` is a plain step),
- the tokens and seconds of layer-skip rounds for each skip count ``M`` (layer selection included),
- prompt lookup's per-token acceptance probability ``alpha_n`` per matched n-gram length ``n``.

Each round it compares the expected tokens per second of its options with plain decoding's
``1 / t_v(0)`` (with a 2% margin):

- prompt lookup, when the context offers a match of ``n`` tokens and ``k`` continuation tokens: a draft
  whose tokens are each accepted with probability ``alpha_n`` (given the previous one was) yields
  ``1 + alpha_n (1 - alpha_n^k) / (1 - alpha_n)`` tokens for ``t_v(k)`` (a lookup costs nothing);
- the layer-skip draft at skip count ``M``: the tokens per second such rounds actually delivered
  (running means of tokens and of seconds), since the draft-exiting threshold makes their length
  vary. It drafts up to ``max_draft_tokens`` and stops at the first unconfident token; a skip count
  with too few rounds yet is assumed 1.5 times as fast as plain decoding, so that it is tried unless
  prompt lookup promises more.
When drafting cannot pay it decodes plainly, and probes with a short draft every ``probe_every`` rounds
so that a change in the text is noticed. The skip count ``M`` is chosen the same way at each layer
selection, among a few candidates, unexplored ones first.

The estimates live on the model's runner and carry over between generations: they describe the
machine and the model, not one request, and they only ever change speed, never output.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class EMA:
    """An exponentially weighted mean that knows whether it has seen anything."""

    def __init__(self, decay: float = 0.8, value: float | None = None) -> None:
        self.decay, self.value = decay, value

    def update(self, x: float) -> None:
        self.value = x if self.value is None else self.decay * self.value + (1 - self.decay) * x


class Acceptance:
    """Per-token acceptance probability from rounds of (drafted, accepted), with a prior.

    A round with ``a`` of ``k`` drafts accepted contributes ``a`` successes and, if ``a < k``, one failure
    (tokens after the first rejection were never tested). Counts decay so recent text weighs more."""

    def __init__(self, prior: float = 0.7, weight: float = 2.0, decay: float = 0.95) -> None:
        self.successes, self.trials = prior * weight, weight
        self.decay = decay
        self.rounds = 0

    @property
    def alpha(self) -> float:
        return min(0.99, self.successes / self.trials)

    def update(self, drafted: int, accepted: int) -> None:
        if drafted <= 0:
            return
        self.successes = self.decay * self.successes + accepted
        self.trials = self.decay * self.trials + accepted + (1 if accepted < drafted else 0)
        self.rounds += 1


def expected_tokens(alpha: float, k: int) -> float:
    """Tokens one round yields with a ``k``-token draft of per-token acceptance ``alpha`` (bonus included)."""
    if k <= 0:
        return 1.0
    if alpha >= 0.999:
        return 1.0 + k
    return 1.0 + alpha * (1 - alpha**k) / (1 - alpha)


@dataclass
class Plan:
    source: str  # "plain", "pld" or "clasp"
    max_tokens: int
    rate: float  # expected tokens per second


@dataclass
class ControllerState:
    """What the controller knows about one model on one machine."""

    num_layers: int
    verify: dict[int, EMA] = field(default_factory=dict)
    lookup: dict[int, Acceptance] = field(default_factory=dict)
    skip_sets: dict[int, tuple[int, ...]] = field(default_factory=dict)  # the last DP result per skip count
    realized: dict[tuple, tuple[EMA, EMA]] = field(default_factory=dict)
    realized_rounds: dict[tuple, int] = field(default_factory=dict)

    def lookup_acceptance(self, ngram: int) -> Acceptance:
        """Prompt lookup's acceptance, per length of the matched n-gram (longer matches are surer)."""
        if ngram not in self.lookup:
            self.lookup[ngram] = Acceptance(prior=0.5, decay=0.8)
        return self.lookup[ngram]

    def realize(self, key: tuple, tokens: int, seconds: float) -> None:
        pair = self.realized.setdefault(key, (EMA(decay=0.9), EMA(decay=0.9)))
        pair[0].update(tokens)
        pair[1].update(seconds)
        self.realized_rounds[key] = self.realized_rounds.get(key, 0) + 1

    def realized_rate(self, key: tuple, min_rounds: int = 4) -> float | None:
        """Tokens per second that rounds of this kind (``("clasp", M)``) actually delivered, as a ratio of
        running means (a mean of per-round rates would undervalue the long, productive rounds); it
        includes what the model of the rate leaves out (early exits, varying draft lengths)."""
        if self.realized_rounds.get(key, 0) < min_rounds:
            return None
        tokens, seconds = self.realized[key]
        return tokens.value / seconds.value if seconds.value else None

    def t_verify(self, k: int) -> float | None:
        """Measured verification time for ``k`` drafts; unmeasured lengths borrow the nearest measured one
        (verification cost is nearly flat in ``k`` while a forward pass is bound by reading weights)."""
        known = {n: e.value for n, e in self.verify.items() if e.value is not None}
        if not known:
            return None
        if k in known:
            return known[k]
        nearest = min(known, key=lambda n: (abs(n - k), -n))
        return known[nearest]


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
    ) -> None:
        self.state = state
        self.max_draft = max_draft
        self.candidates = sorted(set(candidates))
        self.probe_every = probe_every
        self.margin = margin
        self.explore_gain = 1.5
        self.plain_streak = 0

    def clasp_rate(self, num_skip: int, budget: int) -> tuple[int, float]:
        """Draft length and expected tokens/s for layer skipping at ``num_skip``.

        The length is the cap (``max_draft_tokens``, the budget): within it the draft-exiting threshold
        stops the draft at the first unconfident token, which is a sharper per-token decision than any
        length fixed in advance. The rate is what such rounds really delivered (a ratio of running means
        of tokens and seconds, early exits included); a skip count without enough rounds yet is tried."""
        k = min(self.max_draft, budget)
        seen = self.state.realized_rate(("clasp", num_skip))
        if seen is None:  # untried: assume it beats plain decoding by half, so that it gets tried
            t0 = self.state.t_verify(0)
            return k, (self.explore_gain / t0) if t0 else float("inf")
        return k, seen

    def plan(self, num_skip: int, lookup_len: int, budget: int, lookup_ngram: int = 2) -> Plan:
        """This round: draft from prompt lookup (when it found ``lookup_len`` tokens after a match of
        ``lookup_ngram`` tokens), from the layer-skip draft, or not at all, whichever promises the most
        tokens per second."""
        s = self.state
        if budget <= 0:
            return Plan("plain", 0, 0.0)
        t0 = s.t_verify(0)
        plain = 1.0 / t0 if t0 else 0.0
        options = []
        if lookup_len > 0:
            k = min(lookup_len, budget)
            tv = s.t_verify(k)
            rate = expected_tokens(s.lookup_acceptance(lookup_ngram).alpha, k) / tv if tv else float("inf")
            options.append(Plan("pld", k, rate))
        k, rate = self.clasp_rate(num_skip, budget)
        if k > 0 and s.t_verify(0) is not None:  # the first round is plain: it measures the reference
            options.append(Plan("clasp", k, rate))
        best = max(options, key=lambda p: p.rate, default=Plan("plain", 0, plain))
        if best.rate > plain * self.margin:
            self.plain_streak = 0
            return best
        self.plain_streak += 1
        if self.plain_streak >= self.probe_every:  # look again: the text may have become predictable
            self.plain_streak = 0
            if lookup_len > 0:  # the cheaper probe
                return Plan("pld", min(lookup_len, budget), best.rate)
            # A probe is a real round (same cap), so that its measured rate means what it says.
            return Plan("clasp", min(self.max_draft, budget), best.rate)
        return Plan("plain", 0, plain)

    def choose_num_skip(self, current: int) -> int:
        """The skip count for the next stretch: an unexplored candidate first, then the best expected rate."""
        s = self.state
        for m in self.candidates:
            if s.realized_rate(("clasp", m)) is None and s.t_verify(0) is not None:
                return m
        scored = [(self.clasp_rate(m, self.max_draft)[1], m) for m in self.candidates]
        return max(scored)[1] if scored else current

    def charge_selection(self, num_skip: int, seconds: float) -> None:
        """Layer selection serves the layer-skip draft: its cost counts against that draft's rate."""
        self.state.realize(("clasp", num_skip), 0, seconds)

    def observe(
        self,
        source: str,
        drafted: int,
        accepted: int,
        verify_seconds: float,
        draft_seconds: float,
        num_skip: int,
        lookup_ngram: int = 2,
    ) -> None:
        s = self.state
        s.verify.setdefault(drafted, EMA()).update(verify_seconds)
        if source == "clasp" and drafted:
            s.realize(("clasp", num_skip), accepted + 1, draft_seconds + verify_seconds)
        elif source == "pld" and drafted:
            s.lookup_acceptance(lookup_ngram).update(drafted, accepted)
