"""One dataclass of every generation knob, validated in one place with messages that name the problem."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

from .errors import ConfigError
from .sampling import SamplingParams

MAX_SEED = 2**64
"""Seeds are 64-bit: ``0 <= seed < 2**64``."""
MAX_TOP_LOGPROBS = 20
"""The most alternatives per token ``logprobs`` may ask for (OpenAI's limit)."""

CEILINGS = {
    "max_draft_tokens": 256,
    "layer_opt_interval": 1_000_000,
    "lookup_max_ngram": 16,
    "lookup_max_tokens": 256,
    "hybrid_max_lookup": 256,
}
"""Hard upper bounds. ``lookup_max_ngram`` bounds the prompt-lookup index: it holds every n-gram of the
context up to that length, so its memory is linear in the context with this constant factor."""

METHOD_NAMES = ("hybrid", "clasp", "static", "pld", "suffix", "ar")
"""Every drafting method's name, the default first: the vocabulary of ``method``. The registry
(:mod:`.drafting.registry`) says what each name runs and checks that it covers exactly these."""

QUANT_KINDS = ("auto", "none", "int8", "int4")
"""Weight-only quantizations the draft may use (see :mod:`.quant`); the verifier never does. ``auto`` is
int8 where torch has a fused int8 kernel for the model's device, else none."""


@dataclass(frozen=True)
class GenerationConfig:
    """Everything a generation can be asked to do. Defaults were chosen by measurement (docs/tuning.md)."""

    max_new_tokens: int = 128
    min_new_tokens: int = 0  # end-of-sequence tokens are suppressed until this many tokens exist
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # each new token's log-probability and its top ``logprobs`` alternatives
    method: str = "hybrid"  # prompt lookup, CLaSp's layer skip or plain decoding, per round, by cost
    # Layer skipping (clasp, static, hybrid).
    skip_ratio: float = 0.3
    num_skip: int | None = None
    draft_exit_threshold: float = 0.7
    max_draft_tokens: int = 8
    layer_opt_interval: int = 16
    skip_layers: tuple[int, ...] | None = None
    draft_vocab: int = 32768
    draft_quant: str = "auto"  # int8 copies of the draft's layers where a fused kernel exists
    # Prompt lookup (pld, hybrid).
    lookup_min_ngram: int = 1
    lookup_max_ngram: int = 4
    lookup_max_tokens: int = 10
    # Cost-aware control (hybrid and any method with adaptive=True).
    adaptive: bool = False
    hybrid_max_lookup: int = 48  # hybrid: longest lookup draft; the controller picks the length by cost

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(self.temperature, self.top_k, self.top_p)

    def updated(self, **changes) -> GenerationConfig:
        """A copy with ``changes`` applied and validated; unknown names are an error."""
        names = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise ConfigError(f"Unknown generation option(s): {', '.join(unknown)}.")
        if isinstance(changes.get("stop"), str):
            changes["stop"] = (changes["stop"],)
        for name in ("stop", "skip_layers"):
            value = changes.get(name)
            if value is not None and not isinstance(value, (str, tuple)):
                if not isinstance(value, (list, set, frozenset)):
                    raise ConfigError(f"{name} must be a list, got {type(value).__name__}.")
                changes[name] = tuple(value)
        out = replace(self, **changes)
        out.validate()
        return out

    def to_dict(self) -> dict:
        return asdict(self)

    def num_skipped(self, num_layers: int) -> int:
        """How many layers the draft skips for a model of ``num_layers`` layers."""
        if self.skip_layers is not None:
            return len(set(self.skip_layers))
        if self.num_skip is not None:
            if self.num_skip >= num_layers:
                raise ConfigError(f"num_skip={self.num_skip} must be below the model's {num_layers} layers.")
            return self.num_skip
        return min(num_layers - 1, max(1, round(self.skip_ratio * num_layers)))

    def validate(self, num_layers: int | None = None) -> None:
        """Raise :class:`ConfigError` naming the first bad value."""
        _check_numbers(self)
        _check_choices(self)
        if num_layers is not None:
            _check_layers(self, num_layers)

    def __post_init__(self) -> None:
        self.validate()


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_numbers(c: GenerationConfig) -> None:
    if not _is_int(c.max_new_tokens) or c.max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be a positive integer, got {c.max_new_tokens!r}.")
    if not _is_int(c.min_new_tokens) or not 0 <= c.min_new_tokens <= c.max_new_tokens:
        raise ConfigError(f"min_new_tokens must be an integer in [0, max_new_tokens], got {c.min_new_tokens!r}.")
    for name in ("temperature", "top_p", "skip_ratio", "draft_exit_threshold"):
        value = getattr(c, name)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise ConfigError(f"{name} must be a finite number, got {value!r}.")
    if c.temperature < 0:
        raise ConfigError(f"temperature must be >= 0 (0 means greedy), got {c.temperature}.")
    if not 0 < c.top_p <= 1:
        raise ConfigError(f"top_p must be in (0, 1], got {c.top_p}.")
    if not _is_int(c.top_k) or c.top_k < 0:
        raise ConfigError(f"top_k must be an integer >= 0 (0 switches it off), got {c.top_k!r}.")
    if c.logprobs is not None and (not _is_int(c.logprobs) or not 0 <= c.logprobs <= MAX_TOP_LOGPROBS):
        raise ConfigError(
            f"logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}] (alternatives per token), got {c.logprobs!r}."
        )
    if c.seed is not None and (not _is_int(c.seed) or not 0 <= c.seed < MAX_SEED):
        raise ConfigError(f"seed must be an integer in [0, 2**64), got {c.seed!r}.")
    if not 0 < c.skip_ratio < 1:
        raise ConfigError(f"skip_ratio must be in (0, 1), got {c.skip_ratio}.")
    if c.num_skip is not None and (not _is_int(c.num_skip) or c.num_skip < 1):
        raise ConfigError(f"num_skip must be a positive integer, got {c.num_skip!r}.")
    if not 0 <= c.draft_exit_threshold <= 1:
        raise ConfigError(f"draft_exit_threshold must be in [0, 1], got {c.draft_exit_threshold}.")
    for name in ("max_draft_tokens", "layer_opt_interval", "lookup_min_ngram", "lookup_max_ngram"):
        _check_positive(c, name)
    for name in ("lookup_max_tokens", "hybrid_max_lookup"):
        _check_positive(c, name)
    if c.lookup_min_ngram > c.lookup_max_ngram:
        raise ConfigError(f"lookup_min_ngram ({c.lookup_min_ngram}) exceeds lookup_max_ngram ({c.lookup_max_ngram}).")
    if not _is_int(c.draft_vocab) or c.draft_vocab < 0:
        raise ConfigError(f"draft_vocab must be an integer >= 0 (0 means the full vocabulary), got {c.draft_vocab!r}.")


def _check_positive(c: GenerationConfig, name: str) -> None:
    value = getattr(c, name)
    ceiling = CEILINGS.get(name)
    if not _is_int(value) or value < 1 or (ceiling is not None and value > ceiling):
        limit = f" and at most {ceiling}" if ceiling is not None else ""
        raise ConfigError(f"{name} must be a positive integer{limit}, got {value!r}.")


def _check_choices(c: GenerationConfig) -> None:
    if c.method not in METHOD_NAMES:
        raise ConfigError(f"Unknown method {c.method!r}; choose one of {', '.join(METHOD_NAMES)}.")
    if c.draft_quant not in QUANT_KINDS:
        raise ConfigError(f"Unknown draft_quant {c.draft_quant!r}; choose one of {', '.join(QUANT_KINDS)}.")
    if not isinstance(c.adaptive, bool):
        raise ConfigError(f"adaptive must be true or false, got {c.adaptive!r}.")
    if not isinstance(c.stop, tuple) or any(not isinstance(s, str) or not s for s in c.stop):
        raise ConfigError("stop strings must be non-empty strings.")
    if c.skip_layers is not None and (
        not isinstance(c.skip_layers, tuple) or not all(_is_int(i) for i in c.skip_layers)
    ):
        raise ConfigError(f"skip_layers must be a list of layer indices, got {c.skip_layers!r}.")


def _check_layers(c: GenerationConfig, num_layers: int) -> None:
    if c.skip_layers is not None:
        wrong = [i for i in c.skip_layers if not 0 <= i < num_layers]
        if wrong:
            raise ConfigError(
                f"skip_layers {wrong} are not layer indices of a {num_layers}-layer model (0..{num_layers - 1})."
            )
        if len(set(c.skip_layers)) >= num_layers:
            raise ConfigError("skip_layers must leave at least one layer to run.")
    c.num_skipped(num_layers)
