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
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..config import GenerationConfig
from ..context import runner_for
from ..decoding import GenerationResult
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
    api_key: str | None = None
    check_host: bool = True  # bound to loopback: answer only requests addressed to loopback names
    max_body_bytes: int = 4 << 20
    limits: Limits = field(default_factory=Limits)
    max_batch: int | None = None  # requests generated together (None: chosen by measurement)
    kv_pool_tokens: int | None = None  # cache slots the running requests share (None: max_batch x context)


class RequestChecker:
    """Turns a request body into a :class:`Prepared` job, or an :class:`APIError` naming the problem.
    Runs on the preparation thread (parsing, chat templates and tokenization can take seconds)."""

    def __init__(self, model, tokenizer, model_name: str, settings: ServerSettings) -> None:
        self.tokenizer, self.name, self.settings = tokenizer, model_name, settings
        self.runner = runner_for(model)

    def chat(self, raw: bytes, arrived: float) -> Prepared:
        body = parse_body(_json(raw), ChatBody)
        if body.top_logprobs:
            raise APIError(400, "logprobs are not supported.", "top_logprobs")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
        if not any(m["content"].strip() for m in messages):
            raise APIError(400, "messages hold no text.", "messages")
        prompt_ids = self._encode(messages, "messages")
        tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        cfg = self.config(body, len(prompt_ids), self.settings.default_max_tokens, tokens)
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
        cfg = self.config(body, len(prompt_ids), 16, body.max_tokens)
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

    def config(self, body, prompt_len: int, default_tokens: int, max_tokens: int | None) -> GenerationConfig:
        """The generation settings a request asks for, each checked against the server's bounds."""
        self._check_request(body)
        changes: dict[str, Any] = {"max_new_tokens": self._max_tokens(prompt_len, default_tokens, max_tokens)}
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
        if body.logprobs:
            raise APIError(400, "logprobs are not supported.", "logprobs")
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
    :class:`ServerSettings`)."""
    settings = settings or ServerSettings(**kwargs)
    engine = Engine(
        model,
        tokenizer,
        max_queue=settings.max_queue,
        max_batch=settings.max_batch,
        pool_tokens=settings.kv_pool_tokens,
    )
    metrics = Metrics(engine)
    checker = RequestChecker(model, tokenizer, model_name, settings)
    dispatcher = Dispatcher(engine, metrics, settings.request_timeout, settings.max_queue)
    prep = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clasp-prep")
    prep_slots = asyncio.Semaphore(settings.max_queue)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        engine.close()
        prep.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="clasp-decoding", version="0.2.0", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.engine = engine
    app.add_middleware(
        Guard,
        api_key=settings.api_key,
        check_host=settings.check_host,
        on_refuse=lambda path, status: metrics.count(path, status),
    )
    _routes(app, model_name, settings, metrics, checker, dispatcher, prep, prep_slots, engine)
    return app


def _routes(app, model_name, settings, metrics, checker, dispatcher, prep, prep_slots, engine) -> None:
    created = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        metrics.count(request.url.path, exc.status)
        return JSONResponse(exc.body(), status_code=exc.status)

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
        metrics.count("/health", 200)
        return {
            "status": "ok",
            "model": model_name,
            "queue_length": engine.queue_length(),
            "running": engine.running,
            "max_batch": engine.max_batch,
        }

    @app.get("/metrics")
    async def prometheus():
        metrics.count("/metrics", 200)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        metrics.count("/v1/models", 200)
        data = [{"id": model_name, "object": "model", "created": created, "owned_by": "clasp-decoding"}]
        return {"object": "list", "data": data}

    async def prepared(request: Request, check) -> Prepared:
        arrived = time.monotonic()
        raw = await read_body(request, settings.max_body_bytes)
        if prep_slots.locked():
            raise APIError(
                429,
                "The server is busy preparing other requests. Retry later.",
                type_="rate_limit_error",
                code="queue_full",
            )
        async with prep_slots:
            return await asyncio.get_running_loop().run_in_executor(prep, check, raw, arrived)

    async def disconnected(request: Request) -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    @app.post(CHAT)
    async def chat(request: Request):
        p = await prepared(request, checker.chat)
        return await _answer(request, p, dispatcher, metrics, model_name, disconnected, chat=True)

    @app.post(COMPLETIONS)
    async def completions(request: Request):
        p = await prepared(request, checker.completion)
        return await _answer(request, p, dispatcher, metrics, model_name, disconnected, chat=False)


async def _answer(
    request, p: Prepared, dispatcher: Dispatcher, metrics: Metrics, model_name: str, disconnected, chat: bool
):
    """Queue a prepared request; return its JSON answer, or stream its events."""
    job = dispatcher.submit(p)
    prefix, kind = ("chatcmpl", "chat.completion") if chat else ("cmpl", "text_completion")
    head = {"id": f"{prefix}-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": model_name}
    if not p.stream:
        result = await dispatcher.collect(job, lambda: disconnected(request))
        metrics.finished(p.endpoint, result, p.arrived)
        if chat:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": result.text},
                "finish_reason": result.finish_reason,
            }
        else:
            choice = {"index": 0, "text": result.text, "logprobs": None, "finish_reason": result.finish_reason}
        return {**head, "object": kind, "choices": [choice], "usage": usage(result), "clasp": stats_field(result)}
    obj = f"{kind}.chunk" if chat else kind

    def chunk(piece, role=False):
        if chat:
            delta = {"role": "assistant", "content": ""} if role else {"content": piece}
            return {**head, "object": obj, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
        if role:
            return None
        return {
            **head,
            "object": obj,
            "choices": [{"index": 0, "text": piece, "logprobs": None, "finish_reason": None}],
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
