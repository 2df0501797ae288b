"""A model behind a queue, serving many users at once: one worker thread runs the batch scheduler
(:class:`~.batching.Batch`) over every admitted request.

Requests wait in a bounded FIFO (full: :class:`QueueFull`, a 429) until the batch has a place (at most
``max_batch`` at once) and the cache pool has room for their prompt and ``max_new_tokens``; a request
that could never fit the pool fails at once with a message. Each job has its own output channel and
cancel flag: a cancelled job (client gone, timeout, shutdown) leaves the batch at the next iteration, or
is dropped from the queue before it starts, and its cache slots are free at once. Every job owns its
generation and cache slots, so one job's failure or cancellation never touches another's state or
output, and its text is the text it would get alone (:mod:`.batching`).
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


class QueueFull(Exception):
    """The engine's queue holds ``max_queue`` jobs already."""


class EngineClosed(Exception):
    """The engine is shutting down and takes no more jobs."""


@dataclass
class Job:
    """One request's generation: its prompt, settings, deadline and the channel its events go to."""

    prompt_ids: list[int]
    config: GenerationConfig
    loop: asyncio.AbstractEventLoop
    deadline: float
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    id: int = 0
    started: float | None = None  # when its prefill began (the worker's clock)

    def emit(self, kind: str, payload) -> None:
        """Hand an event (``delta``, ``done``, ``timeout``, ``error``, ``shutdown``) to the request's coroutine."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))
        except RuntimeError:  # the event loop is gone (shutdown): nobody is listening any more
            self.cancel()

    def cancel(self) -> None:
        self.cancelled.set()


@dataclass
class EngineStats:
    requests: collections.Counter = field(default_factory=collections.Counter)
    tokens: int = 0
    steps: int = 0
    drafted: int = 0
    accepted: int = 0


class Engine:
    """Runs :class:`Job` s for one model on a single worker thread, up to ``max_batch`` at once.

    ``max_batch`` defaults to what measured costs say pays on this machine
    (:func:`~.batching.default_max_batch`; 1 where the runner cannot batch: then jobs run one at a time);
    ``pool_tokens`` (cache slots shared by the running jobs) to ``max_batch`` times the model's context,
    at most 4096 each."""

    def __init__(
        self, model, tokenizer, *, max_queue: int = 64, max_batch: int | None = None, pool_tokens: int | None = None
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.max_queue = max_queue
        runner = model_state(model).runner
        if max_batch is None:
            max_batch = default_max_batch(runner, _costs(model))
        self.max_batch = max(1, max_batch) if runner.batchable else 1
        per_job = min(runner.max_positions, 4096) + runner.scratch_slots()
        self.batch = Batch(runner, pool_tokens or self.max_batch * per_job, self.max_batch)
        self._pending: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._ids = itertools.count(1)
        self._closed = False
        self._running: dict[int, Job] = {}
        self.stats = EngineStats()
        self._thread = threading.Thread(target=self._work, name="clasp-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ the outside

    @property
    def running(self) -> int:
        """Jobs being generated now."""
        return len(self._running)

    def queue_length(self) -> int:
        """Jobs waiting (not counting the running ones)."""
        with self._cond:
            return sum(1 for j in self._pending if not j.cancelled.is_set())

    def submit(self, job: Job) -> Job:
        with self._cond:
            if self._closed:
                raise EngineClosed
            self._pending = collections.deque(j for j in self._pending if not j.cancelled.is_set())
            if len(self._pending) >= self.max_queue:
                raise QueueFull
            job.id = next(self._ids)
            self._pending.append(job)
            self._cond.notify()
        return job

    def close(self, timeout: float = 5.0) -> None:
        """Stop taking jobs, cancel the waiting and the running ones, and wait up to ``timeout`` seconds
        for the worker (running jobs stop at the next iteration)."""
        with self._cond:
            self._closed = True
            victims = [*self._pending, *self._running.values()]
            self._pending.clear()
            for job in victims:
                job.cancel()
                job.emit("shutdown", None)
            self._cond.notify_all()
        self._thread.join(timeout)

    # ------------------------------------------------------------------ the worker

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self.batch.members and not self._closed:
                    self._cond.wait()
                if self._closed and not self.batch.members:
                    return
            self._admit()
            self.batch.iterate()

    def _admit(self) -> None:
        """Move waiting jobs into the batch while it has a place and the pool has room (in order: a job
        that must wait for room holds the ones behind it)."""
        while not self.batch.full:
            with self._cond:
                while self._pending and self._pending[0].cancelled.is_set():
                    self._pending.popleft()
                if not self._pending:
                    return
                job = self._pending[0]
            if time.monotonic() > job.deadline:
                self._drop(job, "timeout")
                continue
            try:
                room = self.batch.cache_for(len(job.prompt_ids), job.config.max_new_tokens)
                if room is None:
                    return  # wait for running jobs to give slots back
                gen = generation(self.model, self.tokenizer, job.prompt_ids, job.config, cache=room)
            except Exception as e:  # the request's own problem: it fails, nothing else does
                self._drop(job, "error", e)
                continue
            with self._cond:
                self._pending.popleft()
                self._running[job.id] = job
            job.started = time.monotonic()
            self.batch.join(self._member(job, gen))

    def _member(self, job: Job, gen) -> Member:
        def on_chunk(chunk: Chunk) -> None:
            if chunk.text:
                job.emit("delta", chunk.text)
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
        self.stats.requests[status] += 1

    def _drop(self, job: Job, status: str, error: BaseException | None = None) -> None:
        with self._cond:
            if self._pending and self._pending[0] is job:
                self._pending.popleft()
        if status == "error":
            job.emit("error", error)
        else:
            job.emit("timeout", None)
        self.stats.requests[status] += 1


def _costs(model):
    """This model's measured costs (measured now if no generation did yet)."""
    from .costs import measure

    state = model_state(model)
    return state.remember("costs", lambda: measure(state.runner))
