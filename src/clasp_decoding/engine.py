"""A model behind a queue: one worker thread runs generations one at a time, in arrival order.

The model computes one sequence at a time (batch 1), so requests wait in a bounded FIFO. Each job has
its own output channel and cancel flag: a cancelled job (client gone, timeout, shutdown) stops at the
next round boundary, or is dropped from the queue before it starts, and its slot is free at once. Every
job owns its generation (and so its cache), so one job's failure or cancellation cannot touch another's
state or output.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import threading
import time
from dataclasses import dataclass, field

from .api import generation
from .config import GenerationConfig
from .decoding import GenerationResult


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
    """Runs :class:`Job` s for one model on a single worker thread."""

    def __init__(self, model, tokenizer, *, max_queue: int = 64) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.max_queue = max_queue
        self._pending: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._ids = itertools.count(1)
        self._closed = False
        self.running: Job | None = None
        self.stats = EngineStats()
        self._thread = threading.Thread(target=self._work, name="clasp-engine", daemon=True)
        self._thread.start()

    def queue_length(self) -> int:
        """Jobs waiting (not counting the one running)."""
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
        """Stop taking jobs, cancel the waiting and the running one, and wait up to ``timeout`` seconds
        for the worker (it stops at the running job's next round boundary)."""
        with self._cond:
            self._closed = True
            victims = [*self._pending, *([self.running] if self.running is not None else [])]
            self._pending.clear()
            for job in victims:
                job.cancel()
                job.emit("shutdown", None)
            self._cond.notify_all()
        self._thread.join(timeout)

    def _next(self) -> Job | None:
        with self._cond:
            while True:
                while self._pending:
                    job = self._pending.popleft()
                    if not job.cancelled.is_set():
                        self.running = job
                        return job
                if self._closed:
                    return None
                self._cond.wait()

    def _work(self) -> None:
        while (job := self._next()) is not None:
            try:
                self._run(job)
            finally:
                self.running = None

    def _run(self, job: Job) -> None:
        status = "ok"
        gen = None
        try:
            if time.monotonic() > job.deadline:
                status = "timeout"
                return
            gen = generation(self.model, self.tokenizer, job.prompt_ids, job.config)
            result = self._drive(job, gen)
            if result is None:
                status = "cancelled" if job.cancelled.is_set() else "timeout"
                return
            st = result.stats
            self.stats.tokens += st.new_tokens
            self.stats.steps += st.steps
            self.stats.drafted += st.drafted
            self.stats.accepted += st.accepted
            job.emit("done", result)
        except Exception as e:  # one request's failure is its own
            status = "error"
            job.emit("error", e)
        finally:
            if gen is not None:
                gen.close()
            if status == "timeout":
                job.emit("timeout", None)
            self.stats.requests[status] += 1

    @staticmethod
    def _drive(job: Job, gen) -> GenerationResult | None:
        """Step ``gen`` to its end, streaming text; ``None`` if cancelled or past the deadline first."""
        while not gen.done:
            if job.cancelled.is_set() or time.monotonic() > job.deadline:
                return None
            chunk = gen.step()
            if chunk is not None and chunk.text:
                job.emit("delta", chunk.text)
        return gen.result()
