"""A model behind a queue, serving many users at once: one worker thread runs the batch scheduler
(:class:`~.batching.Batch`) over every admitted request.

- **Admission.** Requests wait in a bounded queue (full: :class:`QueueFull`, a 429). The worker admits
  them in arrival order while the batch has a place and the cache pool room for their prompt (a cache
  grows with the text, so what a request *might* write holds nobody back); one that does not fit yet is
  passed over by smaller ones behind it, until it has waited ``starve_after`` seconds, when it holds the
  line until it fits. A job leaves the queue by identity, whatever its neighbours do meanwhile, and the
  worker sleeps on a condition while there is nothing it can do.
- **Isolation.** Each job owns its generation and cache; a failure, cancellation or timeout releases
  its blocks on every path and touches nobody else; its text is the text it gets alone
  (:mod:`.batching`).
- **Prefix reuse.** A finished job's cache is kept (:class:`~.prefix_cache.PrefixCache`, within the
  pool, per scope), and a later prompt that starts with the same tokens fills only the rest, exactly.
- **Draining.** :meth:`drain` refuses new jobs and lets the running and queued ones finish; at its
  deadline :meth:`close` ends the rest with a ``shutdown`` event.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import threading
import time
from dataclasses import dataclass, field

from .api import generation
from .batching import Batch, Member, default_max_batch
from .config import GenerationConfig
from .context import model_state
from .decoding import Chunk
from .errors import InputError
from .prefix_cache import PrefixCache


class QueueFull(Exception):
    """The engine's queue holds ``max_queue`` jobs already."""


class EngineClosed(Exception):
    """The engine is draining or shut down and takes no more jobs."""


@dataclass
class Job:
    """One request's generation: its prompt, settings, deadline, scope (whose cached prefixes it may
    reuse) and the channel its events go to."""

    prompt_ids: list[int]
    config: GenerationConfig
    loop: asyncio.AbstractEventLoop
    deadline: float
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    scope: object = None
    draft_scope: object = None  # whose history in the suffix index it drafts from and adds to
    id: int = 0
    queued: float = field(default_factory=time.monotonic)
    started: float | None = None  # when it was admitted (the worker's clock)
    wake: object = None  # set by the engine: wakes its worker
    timing: dict = field(default_factory=dict)  # the HTTP side's clock marks (arrival, last token)

    def emit(self, kind: str, payload) -> None:
        """Hand an event (``delta``, ``done``, ``timeout``, ``error``, ``shutdown``) to the request's coroutine."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))
        except RuntimeError:  # the event loop is gone (shutdown): nobody is listening any more
            self.cancel()

    def cancel(self) -> None:
        self.cancelled.set()
        if self.wake is not None:
            self.wake()


@dataclass
class EngineStats:
    requests: collections.Counter = field(default_factory=collections.Counter)
    tokens: int = 0
    steps: int = 0
    drafted: int = 0
    accepted: int = 0
    prompt_tokens: int = 0
    reused_tokens: int = 0


class Engine:
    """Runs :class:`Job` s for one model on a single worker thread, up to ``max_batch`` at once.

    ``max_batch`` defaults to what measured costs say pays on this machine
    (:func:`~.batching.default_max_batch`; 1 where the runner cannot batch: then jobs run one at a time);
    ``pool_tokens`` (cache slots shared by the running jobs and the kept prefixes) to ``max_batch`` times
    the model's context, at most 4096 each; ``prefill_chunk`` (prompt tokens per pass while others are
    decoding) to what keeps a pass within about two plain steps, from the same measured costs."""

    def __init__(
        self,
        model,
        tokenizer,
        *,
        max_queue: int = 64,
        max_batch: int | None = None,
        pool_tokens: int | None = None,
        prefill_chunk: int | None = None,
        prefix_cache: bool = True,
        starve_after: float = 5.0,
        suffix_index=None,
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.max_queue, self.starve_after = max_queue, starve_after
        runner = model_state(model).runner
        costs = _costs(model) if (max_batch is None or prefill_chunk is None) and runner.batchable else None
        if max_batch is None:
            max_batch = default_max_batch(runner, costs)
        self.max_batch = max(1, max_batch) if runner.batchable else 1
        per_job = min(runner.max_positions, 4096) + runner.scratch_slots()
        chunk = prefill_chunk if prefill_chunk is not None else default_prefill_chunk(costs)
        self.batch = Batch(runner, pool_tokens or self.max_batch * per_job, self.max_batch, chunk, self._make_room)
        self.prefix = PrefixCache(self.batch.pool, enabled=prefix_cache and runner.numerics.prompt_rowwise)
        self.suffix = suffix_index  # drafts shared across requests (per scope), or None
        self._pending: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._ids = itertools.count(1)
        self._closed = False
        self.draining = False
        self._running: dict[int, Job] = {}
        self.stats = EngineStats()
        self.heartbeat = time.monotonic()
        self.worker_error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="clasp-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ the outside

    @property
    def running(self) -> int:
        """Jobs being generated now (preempted ones included)."""
        return len(self._running)

    @property
    def alive(self) -> bool:
        """Whether the worker thread runs."""
        return self._thread.is_alive()

    def queue_length(self) -> int:
        """Jobs waiting (not counting the running ones)."""
        with self._cond:
            return sum(1 for j in self._pending if not j.cancelled.is_set())

    def pool_state(self) -> dict:
        pool = self.batch.pool
        return {
            "slots": pool.slots,
            "used": pool.used,
            "prefix_slots": self.prefix.slots,
            "prefix_entries": len(self.prefix.entries),
            "preempted": len(self.batch.evicted),
            "preemptions": self.batch.preemptions,
        }

    def submit(self, job: Job) -> Job:
        with self._cond:
            if self._closed or self.draining:
                raise EngineClosed
            self._pending = collections.deque(j for j in self._pending if not j.cancelled.is_set())
            if len(self._pending) >= self.max_queue:
                raise QueueFull
            job.id = next(self._ids)
            job.wake = self._wake
            self._pending.append(job)
            self._cond.notify()
        return job

    def drain(self) -> None:
        """Take no more jobs; the queued and running ones go on (:meth:`idle` says when they are done)."""
        with self._cond:
            self.draining = True
            self._cond.notify()

    def idle(self) -> bool:
        with self._cond:
            return not self._running and not any(not j.cancelled.is_set() for j in self._pending)

    def close(self, timeout: float = 5.0) -> None:
        """Stop taking jobs, end the waiting and the running ones with a ``shutdown`` event, and wait up to
        ``timeout`` seconds for the worker (running jobs stop at the next iteration)."""
        with self._cond:
            self._closed = True
            victims = [*self._pending, *self._running.values()]
            self._pending.clear()
            for job in victims:
                job.emit("shutdown", None)
                job.cancel()
            self._cond.notify_all()
        self._thread.join(timeout)

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify()

    # ------------------------------------------------------------------ the worker

    def _work(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._has_work() and not self._closed:
                        self._cond.wait(timeout=1.0)
                        self.heartbeat = time.monotonic()
                    if self._closed and not self.batch.members:
                        self.prefix.clear()
                        return
                self.heartbeat = time.monotonic()
                self._admit()
                if self.batch.members:
                    self.batch.iterate()
                else:
                    with self._cond:  # nothing runs, nothing fits: wait for a change (a cancel, a new job)
                        if self._has_work() and not self._closed:
                            self._cond.wait(timeout=0.5)
        except BaseException as e:  # a bug in the worker: say so on /health, fail everything in flight
            self.worker_error = e
            with self._cond:
                for job in [*self._pending, *self._running.values()]:
                    job.emit("error", e)
                self._pending.clear()
                self._running.clear()
            raise

    def _has_work(self) -> bool:
        return bool(self.batch.members or self.batch.evicted or any(not j.cancelled.is_set() for j in self._pending))

    def _admit(self) -> None:
        """Preempted jobs first, then waiting ones in order while the batch has a place: each that fits
        goes in; one that does not is passed over, unless it has waited ``starve_after`` seconds."""
        for member in list(self.batch.evicted):
            if not self.batch.readmit(member):
                return
        now = time.monotonic()
        with self._cond:
            waiting = list(self._pending)
        for job in waiting:
            if self.batch.full:
                return
            if job.cancelled.is_set():
                self._remove(job)
                continue
            if now > job.deadline:
                self._remove(job)
                self._count_end("timeout")
                job.emit("timeout", None)
                continue
            outcome = self._start(job)
            if outcome is None and now - job.queued > self.starve_after:
                return  # it has waited long enough: nobody else goes in before it

    def _start(self, job: Job) -> bool | None:
        """Admit ``job``: ``True`` when it runs, ``False`` when it failed (told), ``None`` when it must wait."""
        room = None
        try:
            room = self.batch.cache_for(len(job.prompt_ids), job.config.max_new_tokens)
            if room is None:
                return None
            hit = self.prefix.lookup(job.scope, job.prompt_ids)  # after the allocation, which may free prefixes
            reuse = hit[1] if hit else 0
            if reuse:
                room[0].copy_from(hit[0].cache, reuse)
            holder: list = []
            cache = (room[0], self._release_for(job, holder))
            gen = generation(
                self.model,
                self.tokenizer,
                job.prompt_ids,
                job.config,
                cache=cache,
                reuse=reuse,
                suffix_index=self.suffix,
                scope=job.draft_scope,
            )
            holder.append(gen)
        except Exception as e:  # the request's own problem: it fails, nothing else does
            if room is not None:
                room[1](room[0])
            self._remove(job)
            self._count_end("error")
            job.emit("error", e)
            return False
        with self._cond:
            self._remove(job)
            self._running[job.id] = job
        job.started = time.monotonic()
        self.stats.prompt_tokens += len(job.prompt_ids)
        self.stats.reused_tokens += reuse
        job.emit("started", {"queued": job.started - job.queued, "reused": reuse})
        self.batch.join(self._member(job, gen))
        return True

    def _remove(self, job: Job) -> None:
        with self._cond:
            try:
                self._pending.remove(job)
            except ValueError:
                pass

    def _release_for(self, job: Job, holder: list):
        """The release of ``job``'s cache: kept for prefix reuse when its generation (``holder[0]``, once
        made) completed, else given back to the pool."""

        def release(cache) -> None:
            gen = holder[0] if holder else None
            if gen is not None and gen.finish_reason in ("stop", "length") and not self._closed and cache.length:
                self.prefix.add(job.scope, gen.state.tokens[: cache.length], cache)
            else:
                self.batch.pool.release(cache)

        return release

    def _member(self, job: Job, gen) -> Member:
        def on_chunk(chunk: Chunk) -> None:
            if chunk.token_ids:
                job.emit("delta", chunk)
            if gen.done:
                self._finish(job, gen)

        def on_error(e: BaseException) -> None:
            self._end(job, "error", e)

        def cancelled() -> bool:
            expired = time.monotonic() > job.deadline
            gone = expired or job.cancelled.is_set()
            if gone:
                self._end(job, "timeout" if expired else "cancelled")
            return gone

        return Member(gen, on_chunk=on_chunk, cancelled=cancelled, on_error=on_error, key=job.id)

    def _finish(self, job: Job, gen) -> None:
        result = gen.result()
        st = result.stats
        self.stats.tokens += st.new_tokens
        self.stats.steps += st.steps
        self.stats.drafted += st.drafted
        self.stats.accepted += st.accepted
        job.emit("done", result)
        self._end(job, "ok")

    def _end(self, job: Job, status: str, error: BaseException | None = None) -> None:
        with self._cond:
            if self._running.pop(job.id, None) is None:
                return
        if status == "error":
            job.emit("error", error)
        elif status == "timeout":
            job.emit("timeout", None)
        self._count_end(status)

    def _count_end(self, status: str) -> None:
        self.stats.requests[status] += 1

    def _make_room(self, slots: int) -> bool:
        return self.prefix.free(slots)


def default_prefill_chunk(costs) -> int:
    """Prompt tokens per shared pass while others decode: the largest of 32, 64, 128, 256 whose pass is
    predicted (a straight line through the measured costs of 1 and 32 rows) to cost at most two and a half
    plain steps, so that a joining prompt keeps the running streams' slowest gaps within about three times
    their usual; 64 without costs."""
    if costs is None or 0 not in costs.verify or 31 not in costs.verify:
        return 64
    step, wide = costs.verify[0], costs.verify[31]
    per_row = max(0.0, (wide - step) / 31)
    best = 32
    for rows in (64, 128, 256):
        if step + per_row * rows <= 2.5 * step:
            best = rows
    return best


def _costs(model):
    """This model's measured costs (measured now if no generation did yet)."""
    from .costs import remembered

    state = model_state(model)
    return state.remember("costs", lambda: remembered(state.runner))


__all__ = ["Engine", "EngineClosed", "InputError", "Job", "QueueFull"]
