"""The OpenAI wire format the server speaks: request bodies, their limits, and error bodies.

Everything a client sends is checked here, before any work: unknown fields, fields this server does not
implement, values out of range, text that is not valid Unicode, engine options outside the allow-list
or beyond the server's bounds. Each problem is an :class:`APIError` with OpenAI's error body and a 4xx
status that names the field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..config import QUANT_KINDS
from ..drafting.registry import METHODS


class APIError(Exception):
    """An error answered with OpenAI's body ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        type_: str = "invalid_request_error",
        code: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type_, code
        self.retry_after = retry_after

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str] | None:
        """``Retry-After`` on answers that say to come back later."""
        return {"retry-after": str(self.retry_after)} if self.retry_after is not None else None


def shutting_down() -> APIError:
    return APIError(503, "The server is shutting down.", type_="server_error", code="shutting_down", retry_after=30)


# ----------------------------------------------------------------------------- request bodies

_STRICT = ConfigDict(extra="forbid", allow_inf_nan=False, strict=False)


class ContentPart(BaseModel):
    model_config = _STRICT
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)  # e.g. "name" is harmless
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content or [])


class _Body(BaseModel):
    model_config = _STRICT

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logprobs: bool | int | None = None
    user: str | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None
    clasp: bool | dict[str, Any] | None = None


class ChatBody(_Body):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = None
    top_logprobs: int | None = None
    parallel_tool_calls: bool | None = None


class CompletionBody(_Body):
    prompt: str | list[str] | list[int]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


UNSUPPORTED: dict[str, tuple] = {
    "logit_bias": (None, {}),
    "tools": (None, []),
    "tool_choice": (None, "none", "auto"),
    "functions": (None, []),
    "function_call": (None, "none", "auto"),
    "response_format": (None, {"type": "text"}),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
    "web_search_options": (None,),
    "reasoning_effort": (None,),
}
"""Fields this server does not implement, and the values that ask for nothing (those are accepted)."""


def check_unicode(value: Any, path: str = "") -> None:
    """Refuse strings that cannot be encoded as UTF-8 (JSON lets a body carry lone surrogates)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise APIError(
                400, f"{path or 'the body'} holds an unpaired surrogate (not valid Unicode).", path or None
            ) from None
    elif isinstance(value, dict):
        for k, v in value.items():
            check_unicode(k, path)
            check_unicode(v, f"{path}.{k}" if path else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            check_unicode(v, f"{path}[{i}]")


def parse_body(raw: Any, schema: type[_Body]) -> _Body:
    """Validate a decoded JSON value against ``schema``; every failure is a 400 naming the field."""
    if not isinstance(raw, dict):
        raise APIError(400, "The request body must be a JSON object.")
    check_unicode(raw)
    for name, harmless in UNSUPPORTED.items():
        if name in raw and raw[name] not in harmless:
            raise APIError(400, f"{name} is not supported by this server.", name, code="unsupported_parameter")
        raw.pop(name, None)
    try:
        return schema.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(x) for x in first.get("loc", ()))
        if first.get("type") == "extra_forbidden":
            raise APIError(400, f"Unrecognized request argument supplied: {loc}.", loc) from None
        raise APIError(400, f"{loc}: {first.get('msg')}" if loc else str(first.get("msg")), loc or None) from None


# ----------------------------------------------------------------------------- what a client may set


@dataclass(frozen=True)
class Limits:
    """Server-side bounds on everything a request can set (memory and time included)."""

    max_stop: int = 4
    max_stop_chars: int = 256
    max_top_k: int = 1 << 20
    max_draft_tokens: int = 32
    max_lookup_ngram: int = 8
    max_lookup_tokens: int = 64
    max_layer_opt_interval: int = 4096
    methods: tuple[str, ...] = field(default_factory=lambda: tuple(METHODS))
    draft_vocabs: tuple[int, ...] = (0, 8192, 32768)
    """The draft-vocabulary sizes a request may ask for (each builds and keeps a draft head, so the
    server chooses the set; 0 = the whole vocabulary)."""
    max_top_logprobs: int = 20


INT64 = 1 << 63


def engine_options(options: dict[str, Any], limits: Limits, num_layers: int, vocab_size: int) -> dict[str, Any]:
    """The ``clasp`` object of a request, checked against the allow-list and the server's bounds."""

    def bad(name: str, what: str) -> APIError:
        return APIError(400, f"clasp.{name} {what}.", f"clasp.{name}")

    def integer(name: str, lo: int, hi: int) -> int:
        v = options[name]
        if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
            raise bad(name, f"must be an integer in [{lo}, {hi}], got {v!r}")
        return v

    def number(name: str, lo: float, hi: float, open_low: bool = False, open_high: bool = False) -> float:
        v = options[name]
        ok = isinstance(v, (int, float)) and not isinstance(v, bool)
        if ok:
            ok = (v > lo if open_low else v >= lo) and (v < hi if open_high else v <= hi)
        if not ok:
            raise bad(
                name, f"must be a number in {'(' if open_low else '['}{lo}, {hi}{')' if open_high else ']'}, got {v!r}"
            )
        return float(v)

    checks = {
        "method": lambda n: _choice(options[n], limits.methods, bad(n, f"must be one of {', '.join(limits.methods)}")),
        "skip_ratio": lambda n: number(n, 0, 1, open_low=True, open_high=True),
        "num_skip": lambda n: integer(n, 1, num_layers - 1),
        "skip_layers": lambda n: _layers(
            options[n],
            num_layers,
            bad(n, f"must be a list of distinct layer indices 0..{num_layers - 1} leaving one layer"),
        ),
        "draft_exit_threshold": lambda n: number(n, 0, 1),
        "max_draft_tokens": lambda n: integer(n, 1, limits.max_draft_tokens),
        "layer_opt_interval": lambda n: integer(n, 1, limits.max_layer_opt_interval),
        "draft_vocab": lambda n: _choice(
            options[n], limits.draft_vocabs, bad(n, f"must be one of {', '.join(map(str, limits.draft_vocabs))}")
        ),
        "draft_quant": lambda n: _choice(options[n], QUANT_KINDS, bad(n, f"must be one of {', '.join(QUANT_KINDS)}")),
        "lookup_min_ngram": lambda n: integer(n, 1, limits.max_lookup_ngram),
        "lookup_max_ngram": lambda n: integer(n, 1, limits.max_lookup_ngram),
        "lookup_max_tokens": lambda n: integer(n, 1, limits.max_lookup_tokens),
        "hybrid_max_lookup": lambda n: integer(n, 1, limits.max_lookup_tokens),
        "adaptive": lambda n: _choice(options[n], (True, False), bad(n, "must be true or false")),
    }
    out = {}
    for name in options:
        if name not in checks:
            raise APIError(
                400,
                f"clasp.{name} is not an engine option a request may set; allowed: {', '.join(checks)} "
                "(sampling parameters and stop go at the top level of the request).",
                f"clasp.{name}",
            )
        out[name] = checks[name](name)
    return out


def _choice(value, allowed, error: APIError):
    if isinstance(value, bool) != any(isinstance(a, bool) for a in allowed) or value not in allowed:
        raise error
    return value


def _layers(value, num_layers: int, error: APIError) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        raise error
    if len(set(value)) != len(value) or not all(0 <= i < num_layers for i in value) or len(value) >= num_layers:
        raise error
    return tuple(value)
