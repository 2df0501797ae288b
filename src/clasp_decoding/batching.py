"""Many generations at once: continuous batching with speculation per generation.

The scheduler (:class:`Batch`) decides each iteration who runs and with how many rows; each generation
(:class:`~.decoding.Generation`) keeps its own state (tokens, sampler and seed, drafter, stop strings,
statistics); the runner runs the rows (:meth:`~.runner.ModelRunner.forward_batch`). One iteration:

1. admit waiting generations whose prompt fits the cache pool (:class:`~.kv_cache.KVPool`, bounded: a
   cache takes blocks as its text grows, not what ``max_new_tokens`` might need);
2. make sure every generation's cache can hold its next step; where the pool runs short, give back
   cached prefixes first (the engine's), then preempt the generation holding the most blocks: it gives
   its cache back and waits to be recomputed (:meth:`~.decoding.Generation.evict`), exactly;
3. each running generation proposes its draft (prompt lookup, within the row budget the load policy
   gives it; drafts that would run the model are for a generation alone);
4. one forward pass over every generation's rows: the next chunk of its prompt (at most
   ``prefill_chunk`` prompt tokens per pass while others are decoding, so that a long prompt joining
   never stalls their streams for more than that), or its last token and its draft;
5. each generation accepts, rolls back, stops (end of sequence, length, stop strings), streams.

A request's text does not depend on what it was batched with, how its prompt was cut into chunks, or
whether it was preempted and recomputed: every linear layer runs on row-invariant kernels, every row
attends only to its own generation's cache and on its own (the same kernel as alone), and sampling is
keyed by (seed, position). So greedy and seeded text equal the text the request gets alone (tested).

A generation alone runs its ordinary rounds (:meth:`~.decoding.Generation.step`): the full hybrid,
layer-skip drafts included, as a single user gets. With several, whether drafting pays depends on the
load: rows are nearly free while a pass is bound by reading the weights, not beyond. :class:`LoadPolicy`
measures, at each batch size, passes with 0 (plain), 1, 2, 4 and 8 draft tokens per generation (prompt
lookup, the suffix index) and keeps the limit with the most tokens per second.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .decoding import Chunk, Generation
from .errors import InputError
from .kv_cache import KVPool, PoolShort

MAX_ROWS = 64
"""Rows of one batched pass, prompts aside (a prompt is prefilled whole): drafts are cut to fit."""


class _Rate:
    """Tokens over seconds of recent passes (older ones discounted), and how many were seen."""

    def __init__(self, decay: float = 0.9) -> None:
        self.decay, self.tokens, self.seconds, self.passes = decay, 0.0, 0.0, 0

    def add(self, tokens: int, seconds: float) -> None:
        self.tokens = self.decay * self.tokens + tokens
        self.seconds = self.decay * self.seconds + seconds
        self.passes += 1

    def rate(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


DRAFT_LIMITS = (0, 1, 2, 4, 8)
"""Draft tokens per generation a batched pass may carry (0: plain decoding), the load policy's arms."""


class LoadPolicy:
    """Per batch size (rounded up to a power of two), how many draft tokens each generation may put in a
    pass: each limit of
    :data:`DRAFT_LIMITS` (that fits the pass) is tried a few passes, then the one with the most tokens per
    second is kept, and its neighbours re-tried now and then, in turn (the text moves, and so does what
    pays). A few rows more are nearly free while a pass reads weights and cost throughput once it
    computes; so batched decoding with drafts is never much below plain batched decoding, and takes
    what longer drafts give where they pay."""

    def __init__(self, trial: int = 4, probe_every: int = 16, limits: tuple[int, ...] = DRAFT_LIMITS) -> None:
        self.trial, self.probe_every, self.limits = trial, probe_every, limits
        self.rates: dict[tuple[int, int], _Rate] = {}
        self.passes: dict[int, int] = {}

    def limit(self, size: int, most: int) -> int:
        """Draft tokens per generation for the next pass of ``size`` generations (at most ``most``)."""
        size = _bucket(size)
        n = self.passes.get(size, 0)
        self.passes[size] = n + 1
        arms = [a for a in self.limits if a <= most] or [0]
        for arm in arms:
            rate = self.rates.get((size, arm))
            if rate is None or rate.passes < self.trial:
                return arm
        best = max(range(len(arms)), key=lambda i: self.rates[(size, arms[i])].rate())
        if n % self.probe_every == 0:
            side = -1 if (n // self.probe_every) % 2 else 1
            near = best + side if 0 <= best + side < len(arms) else best - side
            if 0 <= near < len(arms):
                return arms[near]
        return arms[best]

    def observe(self, size: int, limit: int, tokens: int, seconds: float) -> None:
        self.rates.setdefault((_bucket(size), limit), _Rate()).add(tokens, seconds)


def _bucket(size: int) -> int:
    """Batch sizes that share the load policy's measurements: 1, 2, 3-4, 5-8, 9-16, ... (the next power of
    two), so that a batch whose size moves by one as requests come and go does not start over."""
    return 1 << max(0, size - 1).bit_length()


@dataclass
class Member:
    """A generation in the batch, with what the scheduler needs of it."""

    generation: Generation
    on_chunk: Callable[[Chunk], None] = lambda chunk: None
    cancelled: Callable[[], bool] = lambda: False
    on_error: Callable[[BaseException], None] = lambda e: None
    key: object = None
    tokens: list[int] = field(default_factory=list)
    start: int = 0


class Batch:
    """The scheduler: admits generations into a pool of cache blocks, keeps each one's cache large enough
    for its next step (preempting where the pool runs short), and steps all of them together.

    :meth:`iterate` runs one iteration; :meth:`run` until every generation ended (the Python API's batch
    form). Preempted members wait in :attr:`evicted` until the caller gives them a cache again
    (:meth:`readmit`). ``make_room(slots)``, when given, is asked first to free cache memory held for
    later (cached prefixes) and returns whether it freed any."""

    def __init__(
        self, runner, pool_slots: int, max_batch: int, prefill_chunk: int | None = None, make_room=None
    ) -> None:
        self.runner = runner
        self.pool = KVPool(runner.num_layers, pool_slots, runner.dtype)
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        self.make_room = make_room or (lambda slots: False)
        self.members: list[Member] = []
        self.evicted: list[Member] = []
        self.policy = LoadPolicy()
        self.preemptions = 0

    @property
    def full(self) -> bool:
        return len(self.members) + len(self.evicted) >= self.max_batch

    def limit_of(self, prompt_len: int, max_new_tokens: int) -> int:
        """The most cache slots a generation of this size can ever hold."""
        return prompt_len + max_new_tokens + self.runner.scratch_slots()

    def cache_for(self, prompt_len: int, max_new_tokens: int, first: int | None = None):
        """A pool cache for a generation of this size holding ``first`` slots for now (default: its
        prompt and one round), with its release; ``None`` while the pool has not the room. Raises
        :class:`~.errors.InputError` for one that could never fit the pool. A runner that cannot batch
        (the GPU's graph runner, with its one static cache) gives its own cache, one generation at a time."""
        if not self.runner.batchable:
            return self.runner.new_cache(prompt_len, max_new_tokens), self.runner.release_cache
        limit = self.limit_of(prompt_len, max_new_tokens)
        if limit > self.pool.slots:
            raise InputError(
                f"The prompt ({prompt_len} tokens) plus max_new_tokens ({max_new_tokens}) needs {limit} cache slots; "
                f"this server's cache pool holds {self.pool.slots}. Ask for fewer tokens."
            )
        first = min(limit, first if first is not None else prompt_len + 64 + self.runner.scratch_slots())
        cache = self.pool.allocate(first, limit)
        if cache is None and self.make_room(first):
            cache = self.pool.allocate(first, limit)
        return None if cache is None else (cache, self.pool.release)

    def join(self, member: Member) -> None:
        self.members.append(member)

    def readmit(self, member: Member) -> bool:
        """Give a preempted member a cache again (in the order they were preempted); whether it fit."""
        g = member.generation
        s = g.state
        room = self.cache_for(s.prompt_len, s.config.max_new_tokens, first=g.next_end(self.prefill_chunk))
        if room is None:
            return False
        g.attach(*room)
        self.evicted.remove(member)
        self.members.append(member)
        return True

    def iterate(self) -> None:
        """One iteration: a solo step for a lone generation (or where the runner cannot batch), else one
        shared pass for all."""
        self.members = [m for m in self.members if self._alive(m)]
        self.evicted = [m for m in self.evicted if self._alive(m)]
        if not self.members:
            return
        if len(self.members) == 1 or not self.runner.batchable:
            for m in list(self.members):
                if self._fits(m, None):
                    self._solo(m)
        else:
            self._shared()
        self.members = [m for m in self.members if self._alive(m)]

    def run(self) -> None:
        while self.members or self.evicted:
            for m in list(self.evicted):
                if not self.readmit(m):
                    break
            if not self.members and self.evicted:
                m = self.evicted[0]
                self._fail(m, InputError("The cache pool cannot hold this generation."))
                continue
            self.iterate()

    # ------------------------------------------------------------------ room in the pool

    def _fits(self, m: Member, budget: int | None) -> bool:
        """Make ``m``'s cache hold its next step, freeing room where needed (cached prefixes first, then
        the member holding the most blocks, ``m`` itself if it is that one). Whether ``m`` may step."""
        if not self.runner.batchable:
            return True
        g = m.generation
        while True:
            try:
                g.state.cache.ensure(min(g.next_end(budget), g.state.cache.limit))
                return True
            except PoolShort as short:
                if self.make_room(short.needed):
                    continue
                victim = max(self.members, key=lambda x: (x.generation.state.cache.blocks, self.members.index(x)))
                if victim is m and len(self.members) == 1:
                    self._fail(
                        m,
                        InputError(
                            f"The cache pool ({self.pool.slots} slots) cannot hold this generation's next step."
                        ),
                    )
                    return False
                self._preempt(victim)
                if victim is m:
                    return False

    def _preempt(self, m: Member) -> None:
        m.generation.evict()
        self.members.remove(m)
        self.evicted.append(m)
        self.preemptions += 1

    # ------------------------------------------------------------------ the two kinds of iteration

    def _alive(self, m: Member) -> bool:
        if m.generation.done:
            return False
        if m.cancelled():
            m.generation.close()
            return False
        return True

    def _solo(self, m: Member) -> None:
        try:
            chunk = m.generation.step()
        except Exception as e:  # one generation's failure is its own
            self._fail(m, e)
            return
        if chunk is not None:
            m.on_chunk(chunk)

    def _shared(self) -> None:
        decoding = [m for m in self.members if not m.generation.filling]
        budget = self.prefill_chunk if decoding else None  # nobody to stall: a prompt goes in whole
        for m in list(self.members):  # oldest first: a newcomer is preempted before it can push one out
            if m in self.members:
                self._fits(m, budget)
        if not self.members:
            return
        size = len(self.members)
        decoding = [m for m in self.members if not m.generation.filling]
        limit = self.policy.limit(size, max(0, (MAX_ROWS - size) // max(1, len(decoding))))
        ready, left = [], budget
        for m in self.members:
            g = m.generation
            if g.filling and left is not None and left <= 0:
                continue  # this pass's prompt budget is spent: its next chunk waits a pass
            try:
                m.tokens, m.start = g.rows(limit, left)
            except Exception as e:
                self._fail(m, e)
                continue
            if g.filling and left is not None:
                left -= len(m.tokens)
            ready.append(m)
        if not ready:
            return
        t0 = time.perf_counter()
        try:
            logits = self.runner.forward_batch(
                [(m.generation.state.cache, m.tokens, m.start, m.generation.filling) for m in ready]
            )
        except Exception:
            logits = self._apart(ready)  # find whose rows failed; the others' results are the same bits
        before = sum(m.generation.state.generated for m in ready)
        fills = any(m.generation.filling for m in ready)
        for m, rows in zip(ready, logits, strict=True):
            if rows is None:
                continue
            try:
                chunk = m.generation.advance(rows, t0)
            except Exception as e:
                self._fail(m, e)
                continue
            m.on_chunk(chunk)
        if not fills:  # a pass with prompts in it says nothing about decoding speed
            made = sum(m.generation.state.generated for m in ready) - before
            self.policy.observe(size, limit, made, time.perf_counter() - t0)

    def _apart(self, ready: list[Member]) -> list:
        """After a failed shared pass: each generation's rows alone (row-invariant kernels: the same bits
        they would have had together); a generation whose rows fail alone gets the error."""
        out = []
        for m in ready:
            g = m.generation
            try:
                out.append(self.runner.forward_batch([(g.state.cache, m.tokens, m.start, g.filling)])[0])
            except Exception as e:
                self._fail(m, e)
                out.append(None)
        return out

    def _fail(self, m: Member, e: BaseException) -> None:
        m.generation.close()
        if m in self.members:
            self.members.remove(m)
        if m in self.evicted:
            self.evicted.remove(m)
        m.on_error(e)


def default_max_batch(runner, costs) -> int:
    """The most concurrent generations worth running together here, from measured costs: the largest of
    1, 2, 4, 8, 16 whose plain pass (that many rows) costs at most twice a single step, so that each
    doubling still adds at least a third more tokens per second; 1 where the runner cannot batch."""
    if not runner.batchable or costs is None or 0 not in costs.verify:
        return 1
    best = 1
    for size in (2, 4, 8, 16):
        seconds = costs.rows(size)
        if seconds is None or seconds > 2.0 * costs.verify[0]:
            break
        best = size
    return best
