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
class TokenLogprob:
    """A new token's log-probability under the model (its own distribution at that position, before
    temperature, top-k or top-p) and the ``top`` most probable tokens there, best first."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Chunk:
    """What one step produced: the new token ids and the new text (whole characters only); with
    ``logprobs`` asked for, one :class:`TokenLogprob` per new token."""

    token_ids: list[int]
    text: str = ""
    logprobs: list[TokenLogprob] | None = None


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
    logprobs: list[TokenLogprob] | None = None  # one per new token, when asked for


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
    :meth:`result` afterwards. It holds a KV cache until it ends or :meth:`close` is called.

    Before its rounds, the cache is *filled*: the prompt (from slot ``reuse`` when a prefix is already
    there), whose last row gives the first token; or, after :meth:`evict` and :meth:`attach`, every token
    so far but the last (a recomputation). A batch fills in chunks (:meth:`rows` with a budget); every
    row's bits are independent of the cut (row-invariant kernels), so the text is the same."""

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
        reuse: int = 0,
        suffix=None,
        scope=None,
    ) -> None:
        """``cache``: ``(cache, release)`` from elsewhere (a batch's pool) instead of one from the runner;
        ``release(cache)`` is called when the generation ends. ``reuse``: that cache already holds the
        prompt's first ``reuse`` tokens (a reused prefix). ``suffix``: a shared
        :class:`~.suffix_index.SuffixIndex` to draft from (``scope``'s history), to which this generation's
        prompt is added at once and its output as it is accepted."""
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
            suffix=suffix,
            scope=scope,
        )
        self.drafter = drafter
        self.detokenizer = detokenizer
        self.stopper = stopper
        self.stats = GenerationStats(prompt_tokens=len(prompt))
        self.stats.reused_tokens = reuse
        self.finish_reason: str | None = None
        if not 0 <= reuse < len(prompt):
            raise InputError(f"reuse must be below the prompt's length ({len(prompt)}), got {reuse}.")
        self._fill_to: int | None = len(prompt)  # tokens the cache must hold before rounds (None: it does)
        self._filled = reuse
        self._first_fill = True  # the fill ends by choosing the first new token
        self._fill_end = 0
        self.logprobs: list[TokenLogprob] | None = [] if config.logprobs is not None else None
        limits = [runner.numerics.max_verify_drafts, None if runner.max_rows is None else runner.max_rows - 1]
        self.draft_limit = min((x for x in limits if x is not None), default=None)
        self._learning = None  # this generation's live sequence in the suffix index
        if suffix is not None:
            self._learning = suffix.begin(prompt, scope, reserve=config.max_new_tokens)
            self._unlearn = weakref.finalize(self, suffix.end, self._learning)

    # ------------------------------------------------------------------ driving it

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def __iter__(self) -> Iterator[Chunk]:
        while (chunk := self.step()) is not None:
            yield chunk

    @property
    def filling(self) -> bool:
        """Whether the cache is still being filled (a prompt, or a recomputation after :meth:`evict`)."""
        return self._fill_to is not None

    def step(self) -> Chunk | None:
        """The fill (first call) or one round; ``None`` once the generation has ended."""
        if self.done:
            return None
        return self._guarded(lambda: self.finish(self._prefill() if self.filling else self._round()))

    def next_end(self, budget: int | None = None) -> int:
        """The cache slots the next step may write: ``[0, next_end)`` (a fill of at most ``budget``
        tokens; a round's verification, drafts and layer-selection scratch)."""
        s = self.state
        if self.filling:
            return self._fill_to if budget is None else min(self._fill_to, self._filled + budget)
        longest = min(s.config.max_new_tokens - s.generated, max(s.config.max_draft_tokens, s.config.hybrid_max_lookup))
        return s.cache.length + max(longest, 0) + 1 + s.runner.scratch_slots()

    def evict(self) -> None:
        """Give the cache back mid-way (a full pool); :meth:`attach` a new one later, which this generation
        then fills with every token so far (the same bits) before it goes on."""
        self._release()
        self.state.cache = None
        self._fill_to = self.state.prompt_len if self._first_fill else len(self.state.tokens) - 1
        self._filled = 0

    def attach(self, cache, release, reuse: int = 0) -> None:
        """A new cache after :meth:`evict` (holding ``reuse`` tokens of this generation's already)."""
        self.state.cache = cache
        self._release = weakref.finalize(self, release, cache)
        self._filled = reuse

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

    def rows(self, limit: int | None = None, budget: int | None = None) -> tuple[list[int], int]:
        """The tokens this generation puts in the next shared pass, and the slot of the first one: the
        next chunk of its fill (at most ``budget`` tokens), or its last token and a draft (of at most
        ``limit`` tokens, made here without running the model)."""
        s = self.state
        if self.filling:
            self._fill_end = self.next_end(budget)
            return s.tokens[self._filled : self._fill_end], self._filled
        s.solo = False
        try:
            draft = self._guarded(lambda: self.draft(limit))
        finally:
            s.solo = True
        return [s.last_token, *draft.tokens], s.cache.length

    def advance(self, logits: torch.Tensor, started: float) -> Chunk:
        """End a shared step with this generation's ``logits`` (a fill's: its last row's)."""
        if self.filling:
            return self._guarded(lambda: self.finish(self._filled_to(self._fill_end, logits, None, started)))
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
            logprobs=self.logprobs,
        )

    def close(self) -> None:
        """Give the KV cache back (a generation abandoned mid-way ends here) and close its sequence in the
        shared suffix index: from now on it is history (its accepted tokens are kept, whatever ended it:
        each is the model's own output)."""
        if self.finish_reason is None:
            self.finish_reason = "length" if self.state.generated >= self.state.config.max_new_tokens else "cancelled"
        if self._learning is not None:
            self._unlearn()
        self._release()

    # ------------------------------------------------------------------ the loop

    def _prefill(self) -> list[int]:
        """The rest of the fill in one pass: every token through every layer (a prompt's last row gives
        the first new token)."""
        s = self.state
        t0 = time.perf_counter()
        end = self._fill_to
        tokens = torch.tensor(s.tokens[self._filled : end], device=s.runner.device)
        wants = self._first_fill and self.drafter.wants_prefill_hidden()
        logits, hidden = s.runner.forward(s.cache, tokens, self._filled, last_only=True, collect_hidden=wants)
        return self._filled_to(end, logits, hidden[:, -1] if hidden is not None else None, t0)

    def _filled_to(self, end: int, logits: torch.Tensor, hidden: torch.Tensor | None, started: float) -> list[int]:
        """The cache now holds the first ``end`` tokens; at the end of a prompt's fill, choose the first
        new token from ``logits`` (its last row)."""
        s, stats = self.state, self.stats
        s.cache.rollback(end)
        self._filled = end
        stats.time_prefill += time.perf_counter() - started
        if end < self._fill_to:
            return []
        self._fill_to = None
        if not self._first_fill:  # a recomputation: the next token is known already
            return []
        self._first_fill = False
        first = int(s.sampler.choose(logits, s.prompt_len)[0])
        stats.steps = 1
        s.tokens.append(first)
        self._note_logprobs(logits, [first])
        self._record(self.drafter.start(s, hidden))
        return [first]

    def _note_logprobs(self, logits: torch.Tensor, ids: list[int]) -> None:
        """Log-probabilities of the new tokens ``ids`` from the verification's own rows of ``logits``."""
        if self.logprobs is None or not ids:
            return
        lp = torch.log_softmax(logits[: len(ids)].float(), dim=-1)
        chosen = lp.gather(-1, torch.tensor(ids, device=lp.device)[:, None])[:, 0].tolist()
        n = self.state.config.logprobs
        tops = lp.topk(n, dim=-1) if n else None
        for i, (tok, value) in enumerate(zip(ids, chosen, strict=True)):
            top = list(zip(tops.indices[i].tolist(), tops.values[i].tolist(), strict=True)) if tops is not None else []
            self.logprobs.append(TokenLogprob(tok, value, top))

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
        self._note_logprobs(logits, [*draft.tokens[:a], nxt])
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
        if not new:  # a chunk of a fill
            return Chunk([], "", [] if self.logprobs is not None else None)
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
        if self._learning is not None:
            s.suffix.extend(self._learning, s.tokens)
        logprobs = self.logprobs[len(self.logprobs) - len(new) :] if self.logprobs is not None else None
        return Chunk(list(new), text, logprobs)

    def _drop(self, new: list[int], keep: int) -> None:
        """Keep only the first ``keep`` of the round's ``new`` tokens, in the list and in the state."""
        extra = len(new) - keep
        if extra > 0:
            del self.state.tokens[-extra:]
            del new[keep:]
            if self.logprobs is not None:
                del self.logprobs[-extra:]
