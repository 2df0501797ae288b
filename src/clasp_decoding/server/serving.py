"""Between HTTP and the engine: turning a checked request into a job, waiting for it (with the deadline
and the client's presence watched from this side), server-sent events, and the Prometheus metrics."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ..config import GenerationConfig
from ..decoding import GenerationResult, TokenLogprob
from ..engine import Engine, EngineClosed, Job, QueueFull
from ..errors import ClaspError, ConfigError, InputError, RunnerBusyError
from .protocol import APIError, shutting_down

log = logging.getLogger("clasp_decoding.server")

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")


class Metrics:
    """Prometheus metrics. Every request is counted exactly once, by endpoint and final status."""

    def __init__(self, engine: Engine) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "clasp_requests", "Requests by endpoint and final status", ["endpoint", "status"], registry=r
        )
        self.tokens = Counter("clasp_generated_tokens", "Tokens generated", registry=r)
        self.steps = Counter("clasp_verify_steps", "Full-model steps (prefill and verifications)", registry=r)
        self.drafted = Counter("clasp_draft_tokens", "Draft tokens proposed", registry=r)
        self.accepted = Counter("clasp_accepted_draft_tokens", "Draft tokens accepted", registry=r)
        self.latency = Histogram(
            "clasp_request_latency_seconds",
            "Time from arrival to the last token",
            registry=r,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
        )
        self.mean_accepted = Gauge("clasp_mean_accepted_tokens", "Tokens per full-model step, all requests", registry=r)
        self.mean_accepted.set_function(lambda: engine.stats.tokens / engine.stats.steps if engine.stats.steps else 0.0)
        self.queue = Gauge("clasp_queue_length", "Requests waiting", registry=r)
        self.queue.set_function(engine.queue_length)
        self.running = Gauge("clasp_running_requests", "Requests being generated", registry=r)
        self.running.set_function(lambda: float(engine.running))
        self.pool = Gauge(
            "clasp_kv_pool_used_slots", "Cache slots held (running requests and kept prefixes)", registry=r
        )
        self.pool.set_function(lambda: float(engine.batch.pool.used))
        self.pool_capacity = Gauge("clasp_kv_pool_capacity_slots", "Cache slots the pool holds in all", registry=r)
        self.pool_capacity.set_function(lambda: float(engine.batch.pool.slots))
        self.prefix_slots = Gauge("clasp_prefix_cache_slots", "Cache slots held by kept prefixes", registry=r)
        self.prefix_slots.set_function(lambda: float(engine.prefix.slots))
        self.prefix_hits = Gauge("clasp_prefix_cache_hits", "Requests that reused a kept prefix", registry=r)
        self.prefix_hits.set_function(lambda: float(engine.prefix.hits))
        self.prompt_tokens = Gauge("clasp_prompt_tokens", "Prompt tokens admitted", registry=r)
        self.prompt_tokens.set_function(lambda: float(engine.stats.prompt_tokens))
        self.reused_tokens = Gauge("clasp_prompt_tokens_reused", "Prompt tokens whose cache was reused", registry=r)
        self.reused_tokens.set_function(lambda: float(engine.stats.reused_tokens))
        self.preemptions = Gauge("clasp_preemptions", "Requests preempted for cache room (recomputed)", registry=r)
        self.preemptions.set_function(lambda: float(engine.batch.preemptions))
        index = engine.suffix
        self.suffix_tokens = Gauge("clasp_suffix_index_tokens", "Tokens kept in the suffix index", registry=r)
        self.suffix_tokens.set_function(lambda: float(index.size) if index is not None else 0.0)
        self.suffix_bytes = Gauge("clasp_suffix_index_bytes", "Memory of the suffix index", registry=r)
        self.suffix_bytes.set_function(lambda: float(index.nbytes()) if index is not None else 0.0)
        self.suffix_hits = Gauge("clasp_suffix_index_hits", "Suffix-index lookups that found a draft", registry=r)
        self.suffix_hits.set_function(lambda: float(index.hits) if index is not None else 0.0)
        fast = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
        self.ttft = Histogram("clasp_time_to_first_token_seconds", "Arrival to first token", registry=r, buckets=fast)
        self.itl = Histogram(
            "clasp_inter_token_latency_seconds",
            "Time between streamed tokens (a round's gap over its tokens)",
            registry=r,
            buckets=fast,
        )
        self.queue_time = Histogram("clasp_queue_time_seconds", "Arrival to admission", registry=r, buckets=fast)

    def count(self, endpoint: str, status: int | str) -> None:
        self.requests.labels(endpoint if endpoint in ENDPOINTS else "other", str(status)).inc()

    def finished(self, endpoint: str, result: GenerationResult, arrived: float) -> None:
        st = result.stats
        self.tokens.inc(st.new_tokens)
        self.steps.inc(st.steps)
        self.drafted.inc(st.drafted)
        self.accepted.inc(st.accepted)
        self.latency.observe(time.monotonic() - arrived)
        self.count(endpoint, 200)


@dataclass
class Prepared:
    """A checked request, ready to queue (``scope``: whose cached prefixes it may reuse)."""

    endpoint: str
    prompt_ids: list[int]
    config: GenerationConfig
    stream: bool
    include_usage: bool
    arrived: float
    scope: object = None
    draft_scope: object = None


def generation_error(e: BaseException) -> APIError:
    """The answer to a generation that failed in the worker: the user's fault (4xx) or ours (a 500 that
    says nothing of the internals; the traceback goes to the log)."""
    if isinstance(e, (ConfigError, InputError)):
        return APIError(400, str(e))
    if isinstance(e, RunnerBusyError):
        return APIError(503, str(e), type_="server_error", code="busy")
    if isinstance(e, ClaspError):
        return APIError(500, str(e), type_="server_error")
    log.error("generation failed", exc_info=e)
    return APIError(
        500, "Generation failed with an internal error; the server's log has the details.", type_="server_error"
    )


class Dispatcher:
    """Queues prepared requests on the engine and waits for their results or events (timing them)."""

    def __init__(self, engine: Engine, metrics: Metrics, timeout: float, max_queue: int, tokenizer=None) -> None:
        self.engine, self.metrics, self.timeout, self.max_queue = engine, metrics, timeout, max_queue
        self.tokenizer = tokenizer

    def submit(self, p: Prepared) -> Job:
        job = Job(
            p.prompt_ids,
            p.config,
            asyncio.get_running_loop(),
            deadline=p.arrived + self.timeout,
            scope=p.scope,
            draft_scope=p.draft_scope,
        )
        job.timing = {"arrived": p.arrived, "last": None}
        try:
            self.engine.submit(job)
        except QueueFull:
            raise APIError(
                429,
                f"The server is busy: {self.max_queue} requests are already waiting. Retry later.",
                type_="rate_limit_error",
                code="queue_full",
                retry_after=1,
            ) from None
        except EngineClosed:
            raise shutting_down() from None
        return job

    def _timed(self, job: Job, kind: str, payload) -> None:
        """Time to first token, inter-token latency and queue time, from the job's events."""
        t, now = job.timing, time.monotonic()
        if kind == "started":
            self.metrics.queue_time.observe(payload["queued"])
        elif kind == "delta":
            if t["last"] is None:
                self.metrics.ttft.observe(now - t["arrived"])
            else:
                gap = (now - t["last"]) / max(1, len(payload.token_ids))
                for _ in payload.token_ids:
                    self.metrics.itl.observe(gap)
            t["last"] = now

    def logprobs(self, items: list[TokenLogprob] | None, chat: bool) -> dict | None:
        """OpenAI's logprobs object for these tokens: chat's ``content`` list, or the completions API's
        parallel lists."""
        if items is None:
            return None

        def text(token_id: int) -> str:
            return self.tokenizer.decode([token_id]) if self.tokenizer is not None else str(token_id)

        if chat:
            return {
                "content": [
                    {
                        "token": text(i.token_id),
                        "logprob": i.logprob,
                        "bytes": list(text(i.token_id).encode("utf-8")),
                        "top_logprobs": [
                            {"token": text(t), "logprob": v, "bytes": list(text(t).encode("utf-8"))} for t, v in i.top
                        ],
                    }
                    for i in items
                ]
            }
        offsets, at = [], 0
        for i in items:
            offsets.append(at)
            at += len(text(i.token_id))
        return {
            "tokens": [text(i.token_id) for i in items],
            "token_logprobs": [i.logprob for i in items],
            "top_logprobs": [{text(t): v for t, v in i.top} for i in items] if items and items[0].top else None,
            "text_offset": offsets,
        }

    def _timed_out(self) -> APIError:
        return APIError(504, f"The request did not finish within {self.timeout:g} s.", type_="timeout", code="timeout")

    async def _next(self, job: Job, waiters: set) -> tuple[str, Any]:
        """The job's next event, ``("timeout", None)`` at its deadline, or ``("left", None)`` when one of
        ``waiters`` (the client's disconnect) finishes first."""
        remaining = job.deadline - time.monotonic()
        if remaining <= 0:
            return "timeout", None
        while True:
            get = asyncio.ensure_future(job.events.get())
            done, _ = await asyncio.wait({get, *waiters}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
            if get not in done:
                get.cancel()
                return ("left", None) if done else ("timeout", None)
            kind, payload = get.result()
            self._timed(job, kind, payload)
            if kind != "started":
                return kind, payload
            remaining = job.deadline - time.monotonic()

    async def collect(self, job: Job, disconnected: Callable[[], Any]) -> GenerationResult:
        """Wait for a non-streamed job. The deadline is kept here (a long prefill cannot delay the 504),
        and a client that leaves cancels its job."""
        watcher = asyncio.ensure_future(disconnected())
        try:
            while True:
                kind, payload = await self._next(job, {watcher})
                if kind == "delta":
                    continue
                if kind == "done":
                    return payload
                job.cancel()
                if kind == "left":
                    raise APIError(499, "Client closed the request.", code="client_closed")
                if kind == "timeout":
                    raise self._timed_out()
                if kind == "shutdown":
                    raise shutting_down()
                raise generation_error(payload)
        finally:
            watcher.cancel()

    async def events(self, job: Job, p: Prepared, chunk, final, usage) -> AsyncIterator[str]:
        """Server-sent events of a streamed job, ending with ``[DONE]``; an error after the first event is
        sent as an ``error`` event. A client that leaves cancels its job. Counted once, at the end."""
        status: int | None = None
        try:
            first = chunk(None, role=True)
            if first is not None:
                yield sse(first)
            while True:
                kind, payload = await self._next(job, set())
                if kind == "delta":
                    yield sse(chunk(payload))
                    continue
                if kind == "done":
                    yield sse(final(payload))
                    if p.include_usage:
                        yield sse({**final(payload), "choices": [], "usage": usage(payload)})
                    self.metrics.finished(p.endpoint, payload, p.arrived)
                    status = 200
                else:
                    error = (
                        self._timed_out()
                        if kind == "timeout"
                        else shutting_down()
                        if kind == "shutdown"
                        else generation_error(payload)
                    )
                    job.cancel()
                    status = error.status
                    self.metrics.count(p.endpoint, status)
                    yield sse(error.body())
                break
            yield sse("[DONE]")
        finally:
            if status is None:  # the client left mid-stream: free the engine at the next round boundary
                job.cancel()
                self.metrics.count(p.endpoint, 499)


def sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"
