"""A model behind a queue: one worker thread runs generations one at a time, in arrival order.

The model computes one sequence at a time (batch 1), so requests wait in a bounded FIFO. Each job has
its own output channel and cancel flag: a cancelled job (client gone, timeout) stops at the next round
boundary, or is dropped from the queue before it starts, and its slot is free at once. Every job owns
its cache and session, so one job's failure or cancellation cannot touch another's state or output.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import threading
import time
from dataclasses import dataclass, field

from .api import GenerationResult, stream_tokens
from .config import GenerationConfig


class QueueFull(Exception):
    """The engine's queue holds ``max_queue`` jobs already."""


@dataclass
class Job:
    prompt_ids: list[int]
    config: GenerationConfig
    loop: asyncio.AbstractEventLoop
    deadline: float
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    id: int = 0
    enqueued: float = field(default_factory=time.monotonic)
    started: float | None = None

    def emit(self, kind: str, payload) -> None:
        """Hand an event to the request's coroutine, from the worker thread."""
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))

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

    def __init__(self, model, tokenizer, *, max_queue: int = 64, on_finish=None) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.max_queue = max_queue
        self._pending: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._ids = itertools.count(1)
        self._closed = False
        self.running: Job | None = None
        self.stats = EngineStats()
        self.on_finish = on_finish
        self._thread = threading.Thread(target=self._work, name="clasp-engine", daemon=True)
        self._thread.start()

    def queue_length(self) -> int:
        """Jobs waiting (not counting the one running)."""
        with self._cond:
            return sum(1 for j in self._pending if not j.cancelled.is_set())

    def submit(self, job: Job) -> Job:
        with self._cond:
            self._pending = collections.deque(j for j in self._pending if not j.cancelled.is_set())
            if len(self._pending) >= self.max_queue:
                raise QueueFull
            job.id = next(self._ids)
            self._pending.append(job)
            self._cond.notify()
        return job

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _next(self) -> Job | None:
        with self._cond:
            while True:
                while self._pending:
                    job = self._pending.popleft()
                    if not job.cancelled.is_set():
                        return job
                if self._closed:
                    return None
                self._cond.wait()

    def _work(self) -> None:
        while (job := self._next()) is not None:
            self.running = job
            try:
                self._run(job)
            finally:
                self.running = None

    def _run(self, job: Job) -> None:
        job.started = time.monotonic()
        if job.started > job.deadline:
            job.emit("timeout", None)
            return
        status = "ok"
        try:
            gen = stream_tokens(self.model, self.tokenizer, job.prompt_ids, job.config)
            result: GenerationResult | None = None
            while True:
                if job.cancelled.is_set():
                    status = "cancelled"
                    gen.close()
                    break
                if time.monotonic() > job.deadline:
                    status = "timeout"
                    gen.close()
                    job.emit("timeout", None)
                    break
                try:
                    piece, ids = next(gen)
                except StopIteration as done:
                    result = done.value
                    break
                if piece:
                    job.emit("delta", piece)
            if result is not None:
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
            self.stats.requests[status] += 1
            if self.on_finish is not None:
                self.on_finish(job, status)
