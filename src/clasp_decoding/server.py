"""``clasp serve``: an OpenAI-compatible HTTP server (FastAPI + uvicorn) in front of an :class:`Engine`.

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions`` (both with server-sent-event
streaming), ``GET /v1/models``, ``GET /health`` and Prometheus ``GET /metrics``. Errors use OpenAI's
body, ``{"error": {"message", "type", "param", "code"}}``, with the 4xx status that fits. Sampling
parameters take OpenAI's names; ``"clasp": false`` turns speculation off for a request, and
``"clasp": {"method": "pld", ...}`` passes engine options. Responses carry the speculative statistics
in a ``clasp`` field next to ``usage``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from .api import GenerationResult, runner_for
from .config import GenerationConfig
from .decoding import check_prompt
from .engine import Engine, Job, QueueFull
from .errors import ConfigError, InputError
from .text import encode_prompt

# ----------------------------------------------------------------------------- request bodies


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = None
    stream: bool = False
    stream_options: dict | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logprobs: bool | int | None = None
    clasp: bool | dict[str, Any] | None = None


class ContentPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[ContentPart] | None = None


class ChatBody(_Body):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = None


class CompletionBody(_Body):
    prompt: str | list[str] | list[int]
    echo: bool = False
    suffix: str | None = None


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        type_: str = "invalid_request_error",
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type_, code


def error_response(
    status: int, message: str, param: str | None = None, type_: str = "invalid_request_error", code: str | None = None
) -> JSONResponse:
    return JSONResponse(
        {"error": {"message": message, "type": type_, "param": param, "code": code}}, status_code=status
    )


# ----------------------------------------------------------------------------- the app


class Metrics:
    def __init__(self, engine: Engine) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "clasp_requests", "Requests by endpoint and outcome", ["endpoint", "status"], registry=r
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
        self.running.set_function(lambda: 1.0 if engine.running is not None else 0.0)

    def record(self, result: GenerationResult) -> None:
        st = result.stats
        self.tokens.inc(st.new_tokens)
        self.steps.inc(st.steps)
        self.drafted.inc(st.drafted)
        self.accepted.inc(st.accepted)


def create_app(
    model,
    tokenizer,
    model_name: str,
    *,
    base_config: GenerationConfig | None = None,
    max_queue: int = 64,
    request_timeout: float = 300.0,
    default_max_tokens: int = 256,
) -> FastAPI:
    """The FastAPI app serving ``model`` under ``model_name``."""
    base = base_config or GenerationConfig()
    runner = runner_for(model)
    context = runner.max_positions
    engine = Engine(model, tokenizer, max_queue=max_queue)
    metrics = Metrics(engine)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        engine.close()

    app = FastAPI(title="clasp-decoding", version="0.1.0", lifespan=lifespan)
    app.state.engine = engine
    created = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        metrics.requests.labels(request.url.path, str(exc.status)).inc()
        return error_response(exc.status, exc.message, exc.param, exc.type, exc.code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {"loc": (), "msg": "invalid request"}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid":
            message, param = "The request body is not valid JSON.", None
        elif first.get("type") == "model_attributes_type":
            message, param = "The request body must be a JSON object.", None
        else:
            param = ".".join(loc) or None
            message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
        metrics.requests.labels(request.url.path, "400").inc()
        return error_response(400, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return error_response(
            exc.status_code, str(exc.detail), None, "invalid_request_error" if exc.status_code < 500 else "server_error"
        )

    @app.get("/health")
    async def health():
        return {
            "status": "ok",
            "model": model_name,
            "queue_length": engine.queue_length(),
            "running": engine.running is not None,
        }

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "clasp-decoding"}],
        }

    def config_for(body: _Body, prompt_len: int, default_tokens: int, max_tokens: int | None) -> GenerationConfig:
        if body.model != model_name:
            raise APIError(
                404,
                f"The model '{body.model}' does not exist; this server serves '{model_name}'.",
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
        if max_tokens is not None and max_tokens < 1:
            raise APIError(400, f"max_tokens must be at least 1, got {max_tokens}.", "max_tokens")
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise APIError(400, "stop takes up to 4 non-empty strings.", "stop")
        room = context - prompt_len
        if room < 1:
            raise APIError(
                400,
                f"This model's maximum context length is {context} tokens, but the prompt has {prompt_len} tokens.",
                "messages",
                code="context_length_exceeded",
            )
        tokens = max_tokens if max_tokens is not None else min(default_tokens, room)
        if tokens > room:
            raise APIError(
                400,
                f"This model's maximum context length is {context} tokens; the prompt has {prompt_len} "
                f"tokens, so max_tokens can be at most {room}, got {tokens}.",
                "max_tokens",
                code="context_length_exceeded",
            )
        changes: dict[str, Any] = {"max_new_tokens": tokens, "stop": tuple(stops)}
        if body.temperature is not None:
            changes["temperature"] = float(body.temperature)
        if body.top_p is not None:
            changes["top_p"] = float(body.top_p)
        if body.top_k is not None:
            changes["top_k"] = body.top_k
        if body.seed is not None:
            changes["seed"] = body.seed
        if body.clasp is False:
            changes["method"] = "ar"
        elif isinstance(body.clasp, dict):
            changes.update(body.clasp)
        try:
            cfg = base.updated(**changes)
            cfg.validate(runner.num_layers)
            check_prompt(runner, prompt_len, cfg.max_new_tokens)
        except (ConfigError, InputError) as e:
            raise APIError(400, str(e), "clasp" if isinstance(body.clasp, dict) else None) from None
        return cfg

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

    async def submit(endpoint: str, prompt_ids: list[int], cfg: GenerationConfig) -> tuple[Job, float]:
        arrived = time.monotonic()
        job = Job(prompt_ids, cfg, asyncio.get_running_loop(), deadline=arrived + request_timeout)
        try:
            engine.submit(job)
        except QueueFull:
            metrics.requests.labels(endpoint, "429").inc()
            raise APIError(
                429,
                f"The server is busy: {max_queue} requests are already waiting. Retry later.",
                type_="rate_limit_error",
                code="queue_full",
            ) from None
        return job, arrived

    def finish(endpoint: str, arrived: float, status: str, result: GenerationResult | None = None) -> None:
        metrics.requests.labels(endpoint, status).inc()
        if result is not None:
            metrics.record(result)
            metrics.latency.observe(time.monotonic() - arrived)

    async def collect(request: Request, endpoint: str, job: Job, arrived: float) -> GenerationResult:
        """Wait for a non-streamed job; cancel it if the client goes away."""
        while True:
            try:
                kind, payload = await asyncio.wait_for(job.events.get(), timeout=0.25)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    job.cancel()
                    finish(endpoint, arrived, "cancelled")
                    raise APIError(499, "Client closed the request.") from None
                continue
            if kind == "done":
                finish(endpoint, arrived, "200", payload)
                return payload
            if kind == "timeout":
                finish(endpoint, arrived, "504")
                raise APIError(
                    504, f"The request did not finish within {request_timeout:g} s.", type_="timeout", code="timeout"
                )
            if kind == "error":
                finish(endpoint, arrived, "500")
                raise APIError(500, f"Generation failed: {payload}", type_="server_error")

    def sse(obj: dict | str) -> str:
        return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"

    async def stream_events(endpoint: str, job: Job, arrived: float, chunk, final, include_usage: bool):
        ended = False
        try:
            first = chunk(None, role=True)
            if first is not None:
                yield sse(first)
            while True:
                kind, payload = await job.events.get()
                if kind == "delta":
                    yield sse(chunk(payload))
                elif kind == "done":
                    ended = True
                    finish(endpoint, arrived, "200", payload)
                    yield sse(final(payload))
                    if include_usage:
                        yield sse({**final(payload), "choices": [], "usage": usage(payload)})
                    break
                else:
                    ended = True
                    finish(endpoint, arrived, "504" if kind == "timeout" else "500")
                    message = (
                        f"The request did not finish within {request_timeout:g} s."
                        if kind == "timeout"
                        else f"Generation failed: {payload}"
                    )
                    yield sse(
                        {
                            "error": {
                                "message": message,
                                "type": "timeout" if kind == "timeout" else "server_error",
                                "param": None,
                                "code": kind,
                            }
                        }
                    )
                    break
            yield sse("[DONE]")
        finally:
            if not ended:  # the client left mid-stream: free the engine at the next round boundary
                job.cancel()
                finish(endpoint, arrived, "cancelled")

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody, request: Request):
        messages = []
        for m in body.messages:
            content = m.content if isinstance(m.content, str) else "".join(p.text for p in (m.content or []))
            messages.append({"role": "system" if m.role == "developer" else m.role, "content": content})
        if not any(m["content"].strip() for m in messages):
            raise APIError(400, "messages hold no text.", "messages")
        try:
            prompt_ids = encode_prompt(tokenizer, messages)
        except InputError as e:
            raise APIError(400, str(e), "messages") from None
        cfg = config_for(body, len(prompt_ids), default_max_tokens, body.max_completion_tokens or body.max_tokens)
        job, arrived = await submit(request.url.path, prompt_ids, cfg)
        rid, ts = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        head = {"id": rid, "created": ts, "model": model_name}
        if not body.stream:
            result = await collect(request, request.url.path, job, arrived)
            return {
                **head,
                "object": "chat.completion",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": result.text},
                        "finish_reason": result.finish_reason,
                    }
                ],
                "usage": usage(result),
                "clasp": stats_field(result),
            }

        def chunk(piece, role=False):
            delta = {"role": "assistant", "content": ""} if role else {"content": piece}
            return {
                **head,
                "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": delta, "finish_reason": None}],
            }

        def final(result):
            return {
                **head,
                "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": {}, "finish_reason": result.finish_reason}],
                "clasp": stats_field(result),
            }

        include = bool((body.stream_options or {}).get("include_usage"))
        return StreamingResponse(
            stream_events(request.url.path, job, arrived, chunk, final, include), media_type="text/event-stream"
        )

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request):
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            if len(prompt) != 1:
                raise APIError(400, "Only one prompt per request is supported.", "prompt")
            prompt = prompt[0]
        if body.echo or body.suffix:
            raise APIError(400, "echo and suffix are not supported.", "echo" if body.echo else "suffix")
        try:
            prompt_ids = encode_prompt(tokenizer, prompt, raw=True)
        except InputError as e:
            raise APIError(400, str(e), "prompt") from None
        if any(not 0 <= t < runner.vocab_size for t in prompt_ids):
            raise APIError(400, f"prompt token ids must be in 0..{runner.vocab_size - 1}.", "prompt")
        cfg = config_for(body, len(prompt_ids), 16, body.max_tokens)
        job, arrived = await submit(request.url.path, prompt_ids, cfg)
        rid, ts = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        head = {"id": rid, "created": ts, "model": model_name, "object": "text_completion"}
        if not body.stream:
            result = await collect(request, request.url.path, job, arrived)
            return {
                **head,
                "choices": [{"index": 0, "text": result.text, "logprobs": None, "finish_reason": result.finish_reason}],
                "usage": usage(result),
                "clasp": stats_field(result),
            }

        def chunk(piece, role=False):
            if role:
                return None
            return {**head, "choices": [{"index": 0, "text": piece, "logprobs": None, "finish_reason": None}]}

        def final(result):
            return {
                **head,
                "choices": [{"index": 0, "text": "", "logprobs": None, "finish_reason": result.finish_reason}],
                "clasp": stats_field(result),
            }

        include = bool((body.stream_options or {}).get("include_usage"))
        return StreamingResponse(
            stream_events(request.url.path, job, arrived, chunk, final, include), media_type="text/event-stream"
        )

    return app


def serve(
    model_name: str,
    *,
    host: str,
    port: int,
    dtype: str,
    device: str,
    base_config: GenerationConfig,
    max_queue: int,
    request_timeout: float,
    default_max_tokens: int,
    log_level: str = "info",
) -> None:
    """Load the model and run uvicorn until interrupted."""
    import uvicorn

    from .models import load

    model, tokenizer = load(model_name, dtype=dtype, device=device)
    app = create_app(
        model,
        tokenizer,
        model_name,
        base_config=base_config,
        max_queue=max_queue,
        request_timeout=request_timeout,
        default_max_tokens=default_max_tokens,
    )
    uvicorn.run(app, host=host, port=port, log_level=log_level)
