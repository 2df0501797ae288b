"""The routes: ``POST /v1/chat/completions``, ``POST /v1/completions`` (both with server-sent-event
streaming), ``GET /v1/models``, ``GET /health`` and Prometheus ``GET /metrics``.

A request's body is read (bounded), parsed, checked, templated and tokenized on a worker thread, so a
large request never holds the event loop; then it is queued on the engine. Every failure is an OpenAI
error body with a 4xx status, except what is truly the server's fault (a 500 that leaks nothing).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..config import GenerationConfig
from ..context import runner_for
from ..decoding import Chunk, GenerationResult
from ..engine import Engine
from ..errors import ConfigError, InputError
from ..text import encode_prompt
from .protocol import INT64, APIError, ChatBody, CompletionBody, Limits, engine_options, parse_body
from .security import Guard, read_body
from .serving import Dispatcher, Metrics, Prepared

log = logging.getLogger("clasp_decoding.server")

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"


@dataclass
class ServerSettings:
    """What the operator sets (``clasp serve``'s flags)."""

    base_config: GenerationConfig = field(default_factory=GenerationConfig)
    max_queue: int = 64
    request_timeout: float = 300.0
    default_max_tokens: int = 256
    api_key: str | None = None  # one key, or several separated by commas (each user their own)
    check_host: bool = True  # bound to loopback: answer only requests addressed to loopback names
    max_body_bytes: int = 4 << 20
    limits: Limits = field(default_factory=Limits)
    max_batch: int | None = None  # requests generated together (None: chosen by measurement)
    kv_pool_tokens: int | None = None  # cache slots the running requests share (None: max_batch x context)
    prefill_chunk: int | None = None  # prompt tokens per pass while others decode (None: from measured costs)
    prefix_cache: str = "key"  # reuse of earlier requests' caches: within one API key ("key"), "shared", "off"
    suffix_index: str = "key"  # drafts from earlier requests: each key's own history ("key"), "shared", "off"
    suffix_tokens: int = 1 << 20  # the most tokens the suffix index keeps (least recently used dropped)
    suffix_file: str | None = None  # where the suffix index is kept across restarts (None: the cache folder)
    drain_timeout: float = 30.0  # seconds in-flight requests get to finish after SIGTERM / SIGINT
    max_reading: int = 16  # request bodies read at once (more wait; more than max_queue waiting: 429)
    body_timeout: float = 30.0  # seconds a client may take to send its body (408 beyond)

    def api_keys(self) -> list[str]:
        return [k.strip() for k in (self.api_key or "").split(",") if k.strip()]


class RequestChecker:
    """Turns a request body into a :class:`Prepared` job, or an :class:`APIError` naming the problem.
    Runs on the preparation thread (parsing, chat templates and tokenization can take seconds)."""

    def __init__(self, model, tokenizer, model_name: str, settings: ServerSettings) -> None:
        self.tokenizer, self.name, self.settings = tokenizer, model_name, settings
        self.runner = runner_for(model)

    def chat(self, raw: bytes, arrived: float) -> Prepared:
        body = parse_body(_json(raw), ChatBody)
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs set to true.", "top_logprobs")
        if body.logprobs is not None and not isinstance(body.logprobs, bool):
            raise APIError(400, "logprobs must be true or false for chat completions.", "logprobs")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
        if not any(m["content"].strip() for m in messages):
            raise APIError(400, "messages hold no text.", "messages")
        prompt_ids = self._encode(messages, "messages")
        tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        top = body.top_logprobs or 0
        cfg = self.config(
            body, len(prompt_ids), self.settings.default_max_tokens, tokens, top if body.logprobs else None
        )
        return self._prepared(CHAT, prompt_ids, cfg, body, arrived)

    def completion(self, raw: bytes, arrived: float) -> Prepared:
        body = parse_body(_json(raw), CompletionBody)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            if len(prompt) != 1:
                raise APIError(400, "Only one prompt per request is supported.", "prompt")
            prompt = prompt[0]
        if body.echo or body.suffix or body.best_of not in (None, 1):
            name = "echo" if body.echo else "suffix" if body.suffix else "best_of"
            raise APIError(400, f"{name} is not supported.", name)
        prompt_ids = self._encode(prompt, "prompt", raw=True)
        if any(not 0 <= t < self.runner.vocab_size for t in prompt_ids):
            raise APIError(400, f"prompt token ids must be in 0..{self.runner.vocab_size - 1}.", "prompt")
        if isinstance(body.logprobs, bool):
            raise APIError(400, "logprobs must be an integer (alternatives per token) for completions.", "logprobs")
        cfg = self.config(body, len(prompt_ids), 16, body.max_tokens, body.logprobs)
        return self._prepared(COMPLETIONS, prompt_ids, cfg, body, arrived)

    def _encode(self, prompt, param: str, raw: bool = False) -> list[int]:
        context = self.runner.max_positions
        try:
            ids = encode_prompt(self.tokenizer, prompt, raw=raw, limit=context)
        except InputError as e:
            raise APIError(400, str(e), param) from None
        if len(ids) > context:
            raise APIError(
                400,
                f"This model's maximum context length is {context} tokens, but the prompt has more.",
                param,
                code="context_length_exceeded",
            )
        return ids

    def _prepared(self, endpoint, prompt_ids, cfg, body, arrived) -> Prepared:
        include = bool((body.stream_options or {}).get("include_usage"))
        return Prepared(endpoint, prompt_ids, cfg, body.stream, include, arrived)

    def config(
        self, body, prompt_len: int, default_tokens: int, max_tokens: int | None, logprobs: int | None = None
    ) -> GenerationConfig:
        """The generation settings a request asks for, each checked against the server's bounds."""
        self._check_request(body)
        changes: dict[str, Any] = {"max_new_tokens": self._max_tokens(prompt_len, default_tokens, max_tokens)}
        if logprobs is not None:
            top = self.settings.limits.max_top_logprobs
            if not 0 <= logprobs <= top:
                raise APIError(400, f"top_logprobs / logprobs must be in [0, {top}], got {logprobs}.", "top_logprobs")
            changes["logprobs"] = logprobs
        changes["stop"] = self._stops(body.stop)
        for name in ("temperature", "top_p", "top_k"):
            if getattr(body, name) is not None:
                changes[name] = getattr(body, name)
        if body.seed is not None:
            if not -INT64 <= body.seed < INT64:
                raise APIError(400, f"seed must fit in a signed 64-bit integer, got {body.seed}.", "seed")
            changes["seed"] = body.seed % (1 << 64)
        if body.clasp is False:
            changes["method"] = "ar"
        elif isinstance(body.clasp, dict):
            runner = self.runner
            changes.update(engine_options(body.clasp, self.settings.limits, runner.num_layers, runner.vocab_size))
        try:
            cfg = self.settings.base_config.updated(**changes)
            cfg.validate(self.runner.num_layers)
        except ConfigError as e:
            raise APIError(400, str(e), "clasp" if isinstance(body.clasp, dict) else None) from None
        return cfg

    def _check_request(self, body) -> None:
        if body.model != self.name:
            raise APIError(
                404,
                f"The model '{body.model}' does not exist; this server serves '{self.name}'.",
                "model",
                code="model_not_found",
            )
        if body.n not in (None, 1):
            raise APIError(400, "Only n=1 is supported.", "n")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(body, name) not in (None, 0, 0.0):
                raise APIError(400, f"{name} is not supported (it would change the model's distribution).", name)
        if body.temperature is not None and not 0 <= body.temperature <= 2:
            raise APIError(400, f"temperature must be between 0 and 2, got {body.temperature}.", "temperature")
        if body.top_p is not None and not 0 < body.top_p <= 1:
            raise APIError(400, f"top_p must be in (0, 1], got {body.top_p}.", "top_p")
        if body.top_k is not None and not 0 <= body.top_k <= self.settings.limits.max_top_k:
            raise APIError(400, f"top_k must be in [0, {self.settings.limits.max_top_k}], got {body.top_k}.", "top_k")

    def _stops(self, stop) -> tuple[str, ...]:
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        lim = self.settings.limits
        if len(stops) > lim.max_stop or any(not s or len(s) > lim.max_stop_chars for s in stops):
            raise APIError(
                400,
                f"stop takes up to {lim.max_stop} non-empty strings of at most {lim.max_stop_chars} characters.",
                "stop",
            )
        return tuple(stops)

    def _max_tokens(self, prompt_len: int, default_tokens: int, max_tokens: int | None) -> int:
        if max_tokens is not None and max_tokens < 1:
            raise APIError(400, f"max_tokens must be at least 1, got {max_tokens}.", "max_tokens")
        context = self.runner.max_positions
        room = context - prompt_len
        if room < 1:
            raise APIError(
                400,
                f"This model's maximum context length is {context} tokens, but the prompt has {prompt_len} tokens.",
                "messages",
                code="context_length_exceeded",
            )
        tokens = max_tokens if max_tokens is not None else min(default_tokens, room)
        try:
            self.runner.check_fits(prompt_len, tokens)
        except InputError:
            raise APIError(
                400,
                f"This model's maximum context length is {context} tokens; the prompt has {prompt_len} "
                f"tokens, so max_tokens can be at most {room}, got {tokens}.",
                "max_tokens",
                code="context_length_exceeded",
            ) from None
        return tokens


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise APIError(400, "The request body is not valid JSON.") from None
    except ValueError as e:  # e.g. an integer of more digits than Python converts
        raise APIError(400, f"The request body holds a value that cannot be read: {e}.") from None


def stats_field(result: GenerationResult) -> dict:
    st = result.stats
    return {
        "method": result.config.method if result.config else None,
        "mean_accepted_tokens": round(st.mean_accepted_tokens, 4),
        "acceptance_rate": round(st.acceptance_rate, 4),
        "steps": st.steps,
        "drafted": st.drafted,
        "accepted": st.accepted,
        "tokens_per_second": round(st.tokens_per_second, 4),
        "time": st.to_dict()["time"],
    }


def usage(result: GenerationResult) -> dict:
    p, c = len(result.prompt_token_ids), len(result.token_ids)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def create_app(model, tokenizer, model_name: str, settings: ServerSettings | None = None, **kwargs) -> FastAPI:
    """The FastAPI app serving ``model`` under ``model_name`` (``kwargs`` set fields of
    :class:`ServerSettings`). ``app.state.drain()`` starts a graceful drain (``clasp serve`` calls it on
    SIGTERM and SIGINT)."""
    settings = settings or ServerSettings(**kwargs)
    for name in ("prefix_cache", "suffix_index"):
        if getattr(settings, name) not in ("key", "shared", "off"):
            raise ValueError(f"{name} must be 'key', 'shared' or 'off', got {getattr(settings, name)!r}")
    index, index_file = _suffix_index(settings, model_name)
    engine = Engine(
        model,
        tokenizer,
        max_queue=settings.max_queue,
        max_batch=settings.max_batch,
        pool_tokens=settings.kv_pool_tokens,
        prefill_chunk=settings.prefill_chunk,
        prefix_cache=settings.prefix_cache != "off",
        suffix_index=index,
    )
    metrics = Metrics(engine)
    checker = RequestChecker(model, tokenizer, model_name, settings)
    dispatcher = Dispatcher(engine, metrics, settings.request_timeout, settings.max_queue, tokenizer)
    prep = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clasp-prep")
    intake = Intake(settings, prep)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        engine.close()
        prep.shutdown(wait=False, cancel_futures=True)
        if index is not None and index_file is not None:
            try:
                index.save(index_file)
            except OSError as e:
                log.warning("could not keep the suffix index in %s: %s", index_file, e)

    app = FastAPI(title="clasp-decoding", version="0.3.0", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.engine = engine
    app.state.drain = lambda: drain(engine, settings.drain_timeout)
    app.add_middleware(
        Guard,
        api_keys=settings.api_keys(),
        check_host=settings.check_host,
        on_refuse=lambda path, status: metrics.count(path, status),
        draining=lambda: engine.draining,
    )
    _routes(app, model_name, metrics, checker, dispatcher, intake, engine)
    return app


class Intake:
    """Reading and preparing request bodies, with back-pressure before a body is read: at most
    ``max_reading`` bodies read at once (each within ``body_timeout``, else 408), at most ``max_queue``
    requests waiting to be read or prepared (beyond: 429); parsing, templating and tokenizing happen on
    one preparation thread, off the event loop."""

    def __init__(self, settings: ServerSettings, prep: ThreadPoolExecutor) -> None:
        self.settings, self.prep = settings, prep
        self.reading = asyncio.Semaphore(settings.max_reading)
        self.preparing = asyncio.Semaphore(settings.max_queue)
        self.waiting = 0

    async def __call__(self, request: Request, check) -> Prepared:
        arrived = time.monotonic()
        st = self.settings
        if self.waiting >= st.max_queue:
            raise APIError(
                429,
                "The server is busy reading and preparing other requests. Retry later.",
                type_="rate_limit_error",
                code="queue_full",
                retry_after=1,
            )
        self.waiting += 1
        try:
            async with self.reading:
                try:
                    raw = await asyncio.wait_for(read_body(request, st.max_body_bytes), st.body_timeout)
                except asyncio.TimeoutError:
                    raise APIError(408, f"The request body did not arrive within {st.body_timeout:g} s.") from None
            async with self.preparing:
                p = await asyncio.get_running_loop().run_in_executor(self.prep, check, raw, arrived)
        finally:
            self.waiting -= 1
        p.scope = _scope(request, st.prefix_cache)
        p.draft_scope = _scope(request, st.suffix_index)
        return p


def drain(engine: Engine, timeout: float) -> threading.Thread:
    """Refuse new requests (503 ``shutting_down``), give the queued and running ones ``timeout`` seconds to
    finish, then end the rest with a ``shutdown`` error (an error event and ``[DONE]`` in a stream).
    Returns the thread that watches it (done when the engine is closed)."""
    engine.drain()
    deadline = time.monotonic() + timeout

    def watch() -> None:
        while time.monotonic() < deadline and not engine.idle():
            time.sleep(0.05)
        engine.close()

    thread = threading.Thread(target=watch, name="clasp-drain", daemon=True)
    thread.start()
    return thread


def _routes(app, model_name, metrics, checker, dispatcher, intake, engine) -> None:
    created = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        metrics.count(request.url.path, exc.status)
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers())

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        metrics.count(request.url.path, exc.status_code)
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return JSONResponse(APIError(exc.status_code, str(exc.detail), type_=kind).body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.error("unexpected error on %s", request.url.path, exc_info=exc)
        metrics.count(request.url.path, 500)
        error = APIError(500, "Internal server error; the server's log has the details.", type_="server_error")
        return JSONResponse(error.body(), status_code=500)

    @app.get("/health")
    async def health():
        alive = engine.alive and engine.worker_error is None
        status = "down" if not alive else "draining" if engine.draining else "ok"
        code = 200 if status == "ok" else 503
        metrics.count("/health", code)
        body = {
            "status": status,
            "model": model_name,
            "worker": {"alive": alive, "seconds_since_heartbeat": round(time.monotonic() - engine.heartbeat, 3)},
            "queue_length": engine.queue_length(),
            "running": engine.running,
            "max_batch": engine.max_batch,
            "pool": engine.pool_state(),
        }
        return JSONResponse(body, status_code=code, headers={"retry-after": "30"} if code == 503 else None)

    @app.get("/metrics")
    async def prometheus():
        metrics.count("/metrics", 200)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        metrics.count("/v1/models", 200)
        data = [{"id": model_name, "object": "model", "created": created, "owned_by": "clasp-decoding"}]
        return {"object": "list", "data": data}

    async def disconnected(request: Request) -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    @app.post(CHAT)
    async def chat(request: Request):
        p = await intake(request, checker.chat)
        return await _answer(request, p, dispatcher, metrics, model_name, disconnected, chat=True)

    @app.post(COMPLETIONS)
    async def completions(request: Request):
        p = await intake(request, checker.completion)
        return await _answer(request, p, dispatcher, metrics, model_name, disconnected, chat=False)


def _suffix_index(settings: ServerSettings, model_name: str):
    """The server's suffix index (loaded from its file when one was kept) and that file; ``(None, None)``
    when switched off."""
    from ..paths import cache_dir
    from ..suffix_index import SuffixIndex

    if settings.suffix_index == "off":
        return None, None
    safe = "".join(c if c.isalnum() or c in "-._" else "_" for c in model_name)
    path = Path(settings.suffix_file) if settings.suffix_file else cache_dir() / "suffix" / f"{safe}.pt"
    if path.is_file():
        try:
            return SuffixIndex.load(path, settings.suffix_tokens), path
        except Exception as e:  # a damaged file costs what it learned, nothing else
            log.warning("could not read the suffix index in %s (%s); starting empty", path, e)
    return SuffixIndex(settings.suffix_tokens), path


def _scope(request: Request, mode: str):
    """Whose cached prefixes a request may reuse: its API key's (by index: keys are never kept), everyone's,
    or nobody's."""
    if mode == "shared":
        return "shared"
    if mode == "off":
        return object()  # matches nothing
    return ("key", request.scope.get("clasp_key"))


async def _answer(
    request, p: Prepared, dispatcher: Dispatcher, metrics: Metrics, model_name: str, disconnected, chat: bool
):
    """Queue a prepared request; return its JSON answer, or stream its events."""
    job = dispatcher.submit(p)
    prefix, kind = ("chatcmpl", "chat.completion") if chat else ("cmpl", "text_completion")
    head = {"id": f"{prefix}-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": model_name}
    logprobs = p.config.logprobs is not None
    if not p.stream:
        result = await dispatcher.collect(job, lambda: disconnected(request))
        metrics.finished(p.endpoint, result, p.arrived)
        lp = dispatcher.logprobs(result.logprobs, chat) if logprobs else None
        if chat:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": result.text},
                "logprobs": lp,
                "finish_reason": result.finish_reason,
            }
        else:
            choice = {"index": 0, "text": result.text, "logprobs": lp, "finish_reason": result.finish_reason}
        return {**head, "object": kind, "choices": [choice], "usage": usage(result), "clasp": stats_field(result)}
    obj = f"{kind}.chunk" if chat else kind

    def chunk(piece: Chunk | None, role=False):
        if chat:
            delta = {"role": "assistant", "content": ""} if role else {"content": piece.text}
            out = {"index": 0, "delta": delta, "finish_reason": None}
            if logprobs and not role:
                out["logprobs"] = dispatcher.logprobs(piece.logprobs, chat)
            return {**head, "object": obj, "choices": [out]}
        if role:
            return None
        lp = dispatcher.logprobs(piece.logprobs, chat) if logprobs else None
        return {
            **head,
            "object": obj,
            "choices": [{"index": 0, "text": piece.text, "logprobs": lp, "finish_reason": None}],
        }

    def final(result):
        end = {"index": 0, "delta": {}} if chat else {"index": 0, "text": "", "logprobs": None}
        return {
            **head,
            "object": obj,
            "choices": [{**end, "finish_reason": result.finish_reason}],
            "clasp": stats_field(result),
        }

    return StreamingResponse(dispatcher.events(job, p, chunk, final, usage), media_type="text/event-stream")
