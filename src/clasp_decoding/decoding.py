"""One generation, from the prefill to the last token: the draft / verify / accept loop.

One round, with ``n`` verified tokens in the cache and the last token ``x`` not yet in it::

    draft  = drafter.propose(state, k_max)               # d_1..d_k (may write scratch K/V at n..)
    logits = runner.forward([x, d_1..d_k], start=n)      # all layers; overwrites slots n..n+k
    a, t   = sampler.accept(draft, logits)               # a drafts agree; t is the target's next token
    cache.length = n + a + 1                             # rollback: move the valid length, copy nothing
    emit d_1..d_a, t                                     # cut at EOS / max_new_tokens / stop strings
    drafter.observe(outcome)                             # adapt (a new skip set every few rounds)

Greedy acceptance and position-keyed sampling keep the output identical to plain decoding's (with the
same seed); speculative sampling keeps it distributed exactly as plain sampling. :class:`Generation`
owns all of it, statistics included; drafters only propose and observe.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import torch

from .config import GenerationConfig
from .drafting.base import Draft, Drafter, Outcome, Selection
from .errors import InputError
from .runner import ModelRunner
from .sampling import Sampler
from .state import DecodeState, ModelState
from .stats import GenerationStats
from .text import IncrementalDecoder

KEYED_UNSEEDED = True
"""Unseeded sampling uses position-keyed sampling too, with a random seed (docs/sampling.md explains the
measurement behind this choice); ``False`` switches it to speculative sampling."""

T = TypeVar("T")

Stopper = Callable[[list[int], int], int | None]
"""``stopper(tokens, new)``: after a round added ``new`` tokens to ``tokens`` (prompt included), how many
of them to keep because generation must stop there, or ``None`` to go on."""


@dataclass
class Chunk:
    """What one step produced: the new token ids and the new text (whole characters only)."""

    token_ids: list[int]
    text: str = ""


@dataclass
class GenerationResult:
    """``text`` is the decoded new text (cut before a stop string); ``token_ids`` the new tokens (through
    the one that completed a stop string, or the EOS token)."""

    text: str
    token_ids: list[int]
    prompt_token_ids: list[int]
    finish_reason: str  # "stop" (EOS, stop string or a stopper) or "length"
    stats: GenerationStats = field(default_factory=GenerationStats)
    config: GenerationConfig | None = None


def sampler_for(
    config: GenerationConfig, device, eos_ids: frozenset[int], prompt_len: int, mode: str | None = None
) -> Sampler:
    """Greedy, or position-keyed sampling keyed by the seed (a random one when none is given). ``mode``
    forces ``"keyed"`` or ``"speculative"`` sampling (tests and measurements compare the two)."""
    params = config.sampling
    minimum = prompt_len + config.min_new_tokens
    if params.greedy:
        return Sampler(params, mode="greedy", device=device, eos_ids=eos_ids, min_length=minimum)
    seed = config.seed if config.seed is not None else int(torch.randint(2**62, ()).item())
    if mode is None:
        mode = "keyed" if config.seed is not None or KEYED_UNSEEDED else "speculative"
    return Sampler(params, mode=mode, seed=seed, device=device, eos_ids=eos_ids, min_length=minimum)


class Generation:
    """One generation in flight. Iterate it (or call :meth:`step`) for a :class:`Chunk` per round; read
    :meth:`result` afterwards. It holds a KV cache until it ends or :meth:`close` is called."""

    def __init__(
        self,
        runner: ModelRunner,
        prompt_ids: Sequence[int],
        config: GenerationConfig,
        drafter: Drafter,
        *,
        model: ModelState | None = None,
        eos_ids: frozenset[int] = frozenset(),
        detokenizer: IncrementalDecoder | None = None,
        stopper: Stopper | None = None,
        sampler_mode: str | None = None,
        cache=None,
    ) -> None:
        """``cache``: ``(cache, release)`` from elsewhere (a batch's pool) instead of one from the runner;
        ``release(cache)`` is called when the generation ends."""
        config.validate(runner.num_layers)
        prompt = list(prompt_ids)
        bad = [t for t in prompt if not 0 <= t < runner.vocab_size]
        if bad:
            raise InputError(f"Prompt token ids {bad[:5]} are outside the vocabulary (0..{runner.vocab_size - 1}).")
        model = model or ModelState(runner)
        runner.check_fits(len(prompt), config.max_new_tokens)
        drafter.warm_up(model, config)
        if cache is None:
            cache, release = runner.new_cache(len(prompt), config.max_new_tokens), runner.release_cache
        else:
            cache, release = cache
        self._release = weakref.finalize(self, release, cache)
        eos = frozenset(eos_ids)
        self.state = DecodeState(
            runner=runner,
            cache=cache,
            config=config,
            sampler=sampler_for(config, runner.device, eos, len(prompt), sampler_mode),
            eos_ids=eos,
            tokens=prompt,
            prompt_len=len(prompt),
            model=model,
        )
        self.drafter = drafter
        self.detokenizer = detokenizer
        self.stopper = stopper
        self.stats = GenerationStats(prompt_tokens=len(prompt))
        self.finish_reason: str | None = None
        limits = [runner.numerics.max_verify_drafts, None if runner.max_rows is None else runner.max_rows - 1]
        self.draft_limit = min((x for x in limits if x is not None), default=None)

    # ------------------------------------------------------------------ driving it

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def __iter__(self) -> Iterator[Chunk]:
        while (chunk := self.step()) is not None:
            yield chunk

    def step(self) -> Chunk | None:
        """Prefill (first call) or one round; ``None`` once the generation has ended."""
        if self.done:
            return None
        return self._guarded(lambda: self.finish(self._prefill() if self.stats.steps == 0 else self._round()))

    def _guarded(self, work: Callable[[], T]) -> T:
        """Run part of a step: its time counted, the cache given back if it fails or the generation ends."""
        t0 = time.perf_counter()
        try:
            chunk = work()
        except BaseException:
            self.close()
            raise
        finally:
            self.stats.time_total += time.perf_counter() - t0
        if self.done:
            self.close()
        return chunk

    # A step shared with other generations (a batch, :mod:`.batching`): ``rows()`` gives this
    # generation's tokens for the pass (the prompt, or the last token and a draft) and the first slot;
    # the batch runs them with everyone else's; ``advance(logits, started)`` takes this generation's
    # logits (the last row for a prompt) and ends the step.

    def rows(self, limit: int | None = None) -> tuple[list[int], int]:
        """The tokens this generation puts in the next shared pass, and the slot of the first one. A
        draft (of at most ``limit`` tokens) is made here, without running the model."""
        s = self.state
        if self.stats.steps == 0:
            return list(s.tokens), 0
        s.solo = False
        try:
            draft = self._guarded(lambda: self.draft(limit))
        finally:
            s.solo = True
        return [s.last_token, *draft.tokens], s.cache.length

    def advance(self, logits: torch.Tensor, started: float) -> Chunk:
        """End a shared step with this generation's ``logits``."""
        if self.stats.steps == 0:
            return self._guarded(lambda: self.finish(self._prefilled(logits, None, started)))
        return self._guarded(lambda: self.finish(self.verified(logits, None, started, shared=True)))

    def run(self) -> GenerationResult:
        """Generate to the end; the result."""
        for _ in self:
            pass
        return self.result()

    def result(self) -> GenerationResult:
        s = self.state
        self.stats.new_tokens = s.generated
        return GenerationResult(
            text=self.detokenizer.text if self.detokenizer is not None else "",
            token_ids=s.tokens[s.prompt_len :],
            prompt_token_ids=s.tokens[: s.prompt_len],
            finish_reason=self.finish_reason or "length",
            stats=self.stats,
            config=s.config,
        )

    def close(self) -> None:
        """Give the KV cache back (a generation abandoned mid-way ends here)."""
        if self.finish_reason is None:
            self.finish_reason = "length" if self.state.generated >= self.state.config.max_new_tokens else "cancelled"
        self._release()

    # ------------------------------------------------------------------ the loop

    def _prefill(self) -> list[int]:
        """Every prompt token through every layer; the first new token comes from its last row."""
        s = self.state
        t0 = time.perf_counter()
        prompt = torch.tensor(s.tokens, device=s.runner.device)
        logits, hidden = s.runner.forward(
            s.cache, prompt, 0, last_only=True, collect_hidden=self.drafter.wants_prefill_hidden()
        )
        return self._prefilled(logits, hidden[:, -1] if hidden is not None else None, t0)

    def _prefilled(self, logits: torch.Tensor, hidden: torch.Tensor | None, started: float) -> list[int]:
        s, stats = self.state, self.stats
        s.cache.rollback(s.prompt_len)
        first = int(s.sampler.choose(logits, s.prompt_len)[0])
        stats.time_prefill = time.perf_counter() - started
        stats.steps = 1
        s.tokens.append(first)
        self._record(self.drafter.start(s, hidden))
        return [first]

    def _round(self) -> list[int]:
        s = self.state
        draft = self.draft()
        inputs = torch.tensor([s.last_token, *draft.tokens], device=s.runner.device)
        t0 = time.perf_counter()
        logits, hidden = s.runner.forward(s.cache, inputs, s.cache.length, collect_hidden=self.drafter.wants_hidden(s))
        return self.verified(logits, hidden, t0, inputs[1:])

    # The phases of a round, apart, so that a batch of generations can share one forward pass
    # (:mod:`.batching`): ``draft()``, then the model over ``[last token, drafts]`` from slot
    # ``cache.length``, then ``verified(logits, hidden, started)``; ``finish(new)`` ends the round.

    def draft(self, limit: int | None = None) -> Draft:
        """This round's draft (at most ``limit`` tokens when given): proposed, cut to the token budget and
        the rows one call may verify exactly, recorded."""
        s, stats = self.state, self.stats
        budget = s.config.max_new_tokens - s.generated
        room = budget - 1 if self.draft_limit is None else min(budget - 1, self.draft_limit)
        if limit is not None:
            room = min(room, limit)
        t0 = time.perf_counter()
        draft = self.drafter.propose(s, room) if room > 0 else Draft([])
        if len(draft) > max(room, 0):
            draft = Draft(
                draft.tokens[:room], draft.source, None if draft.probs is None else draft.probs[:room], draft.selection
            )
        draft_seconds = time.perf_counter() - t0 - (draft.selection.seconds if draft.selection else 0.0)
        self._record(draft.selection)
        stats.time_draft += draft_seconds
        self._pending = (draft, draft_seconds)
        return draft

    def verified(
        self,
        logits: torch.Tensor,
        hidden: torch.Tensor | None,
        started: float,
        draft_ids: torch.Tensor | None = None,
        shared: bool = False,
    ) -> list[int]:
        """Accept against the target's ``logits`` ``[k + 1, V]`` for this round's draft (``draft_ids`` on the
        device, if at hand; the forward pass began at ``started``); roll back, append, learn. ``shared``:
        the pass served other generations too, so its time is not this generation's cost to learn from.
        Returns the round's new tokens."""
        s = self.state
        draft, draft_seconds = self._pending
        accepted, verify_seconds = self._accept(draft, logits, started, draft_ids)
        new = [*draft.tokens[:accepted], s.tokens[-1]]
        s.round += 1
        outcome = Outcome(draft, accepted, hidden, draft_seconds, None if shared else verify_seconds)
        self._record(self.drafter.observe(s, outcome))
        return new

    def _accept(self, draft: Draft, logits: torch.Tensor, started: float, draft_ids) -> tuple[int, float]:
        s, stats = self.state, self.stats
        n = s.cache.length
        k = len(draft)
        if draft_ids is None:
            draft_ids = torch.tensor(draft.tokens, dtype=torch.long, device=logits.device)
        a, nxt = s.sampler.accept(draft_ids, draft.probs, logits, n + 1)
        seconds = time.perf_counter() - started  # the acceptance's host sync makes this the real time
        s.cache.rollback(n + a + 1)
        s.tokens.extend([*draft.tokens[:a], nxt])
        stats.time_verify += seconds
        stats.steps += 1
        stats.drafted += k
        stats.accepted += a
        stats.accepted_lengths.append(a)
        stats.draft_lengths.append(k)
        stats.modes.append(str(draft.source))
        return a, seconds

    def _record(self, selection: Selection | None) -> None:
        if selection is None:
            return
        self.stats.skip_sets.append((self.stats.steps, selection.skip))
        if selection.ran_dp:
            self.stats.layer_selections += 1
        self.stats.time_select += selection.seconds

    def finish(self, new: list[int]) -> Chunk:
        """Cut the round's new tokens (already in ``state.tokens``) at EOS, the token limit, a stopper
        or a stop string; decide whether the generation goes on; decode the new text."""
        s = self.state
        eos_cut = next((i + 1 for i, t in enumerate(new) if t in s.eos_ids), None)
        over = s.generated - s.config.max_new_tokens
        length_cut = len(new) - over if over >= 0 else None
        cuts = [c for c in (eos_cut, length_cut) if c is not None]
        if cuts:
            self._drop(new, min(cuts))
            stopped = eos_cut is not None and (length_cut is None or eos_cut <= length_cut)
            self.finish_reason = "stop" if stopped else "length"
        if self.stopper is not None:
            cut = self.stopper(s.tokens, len(new))
            if cut is not None:
                self._drop(new, cut)
                self.finish_reason = "stop"
        text = ""
        if self.detokenizer is not None:
            text, cut = self.detokenizer.add(new)
            if cut is not None:
                self._drop(new, cut + 1)
                self.finish_reason = "stop"
            elif self.done:
                text += self.detokenizer.flush()
        self.stats.new_tokens = s.generated
        return Chunk(list(new), text)

    def _drop(self, new: list[int], keep: int) -> None:
        """Keep only the first ``keep`` of the round's ``new`` tokens, in the list and in the state."""
        extra = len(new) - keep
        if extra > 0:
            del self.state.tokens[-extra:]
            del new[keep:]
