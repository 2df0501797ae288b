"""One dataclass of every generation knob, validated in one place with messages that name the problem."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace

from .errors import ConfigError
from .sampling import SamplingParams

METHODS = ("hybrid", "clasp", "static", "pld", "ar")
"""Drafting strategies: prompt lookup or CLaSp's layer skip or nothing, per round, under cost-aware
control (the default); CLaSp's dynamic layer skip alone; a fixed skip set; prompt lookup; and none at all
(plain autoregressive decoding through the same loop)."""


@dataclass(frozen=True)
class GenerationConfig:
    """Everything a generation can be asked to do. Defaults were chosen by measurement (docs/tuning.md)."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    method: str = "hybrid"  # prompt lookup, CLaSp's layer skip or plain decoding, per round, by cost
    # Layer skipping (clasp, static, hybrid).
    skip_ratio: float = 0.3
    num_skip: int | None = None
    draft_exit_threshold: float = 0.7
    max_draft_tokens: int = 8
    layer_opt_interval: int = 16
    skip_layers: tuple[int, ...] | None = None
    draft_vocab: int = 32768
    # Prompt lookup (pld, hybrid).
    lookup_min_ngram: int = 1
    lookup_max_ngram: int = 4
    lookup_max_tokens: int = 10
    # Cost-aware control (hybrid and any method with adaptive=True).
    adaptive: bool = False
    hybrid_max_lookup: int = 48  # hybrid: longest lookup draft; the controller picks the length by cost
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(self.temperature, self.top_k, self.top_p)

    def updated(self, **changes) -> GenerationConfig:
        """A copy with ``changes`` applied and validated; unknown names are an error."""
        names = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise ConfigError(f"Unknown generation option(s): {', '.join(unknown)}.")
        if "stop" in changes and isinstance(changes["stop"], str):
            changes["stop"] = (changes["stop"],)
        if "stop" in changes and changes["stop"] is not None:
            changes["stop"] = tuple(changes["stop"])
        if changes.get("skip_layers") is not None:
            changes["skip_layers"] = tuple(changes["skip_layers"])
        out = replace(self, **changes)
        out.validate()
        return out

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("extra")
        return d

    def num_skipped(self, num_layers: int) -> int:
        """How many layers the draft skips for a model of ``num_layers`` layers."""
        if self.skip_layers is not None:
            return len(self.skip_layers)
        if self.num_skip is not None:
            if self.num_skip >= num_layers:
                raise ConfigError(f"num_skip={self.num_skip} must be below the model's {num_layers} layers.")
            return self.num_skip
        return min(num_layers - 1, max(1, round(self.skip_ratio * num_layers)))

    def validate(self, num_layers: int | None = None) -> None:
        """Raise :class:`ConfigError` naming the first bad value."""

        def bad(msg: str) -> None:
            raise ConfigError(msg)

        if not isinstance(self.max_new_tokens, int) or isinstance(self.max_new_tokens, bool) or self.max_new_tokens < 1:
            bad(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}.")
        for name in ("temperature", "top_p", "skip_ratio", "draft_exit_threshold"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                bad(f"{name} must be a finite number, got {value!r}.")
        if self.temperature < 0:
            bad(f"temperature must be >= 0 (0 means greedy), got {self.temperature}.")
        if not 0 < self.top_p <= 1:
            bad(f"top_p must be in (0, 1], got {self.top_p}.")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            bad(f"top_k must be an integer >= 0 (0 switches it off), got {self.top_k!r}.")
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            bad(f"seed must be a non-negative integer, got {self.seed!r}.")
        if any(not isinstance(s, str) or not s for s in self.stop):
            bad("stop strings must be non-empty strings.")
        if self.method not in METHODS:
            bad(f"Unknown method {self.method!r}; choose one of {', '.join(METHODS)}.")
        if not 0 < self.skip_ratio < 1:
            bad(f"skip_ratio must be in (0, 1), got {self.skip_ratio}.")
        if self.num_skip is not None and (not isinstance(self.num_skip, int) or self.num_skip < 1):
            bad(f"num_skip must be a positive integer, got {self.num_skip!r}.")
        if not 0 <= self.draft_exit_threshold <= 1:
            bad(f"draft_exit_threshold must be in [0, 1], got {self.draft_exit_threshold}.")
        for name in (
            "max_draft_tokens",
            "layer_opt_interval",
            "lookup_min_ngram",
            "lookup_max_ngram",
            "lookup_max_tokens",
            "hybrid_max_lookup",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                bad(f"{name} must be a positive integer, got {value!r}.")
        if self.lookup_min_ngram > self.lookup_max_ngram:
            bad(f"lookup_min_ngram ({self.lookup_min_ngram}) exceeds lookup_max_ngram ({self.lookup_max_ngram}).")
        if not isinstance(self.draft_vocab, int) or self.draft_vocab < 0:
            bad(f"draft_vocab must be an integer >= 0 (0 means the full vocabulary), got {self.draft_vocab!r}.")
        if num_layers is not None:
            if self.skip_layers is not None:
                wrong = [i for i in self.skip_layers if not isinstance(i, int) or not 0 <= i < num_layers]
                if wrong:
                    bad(
                        f"skip_layers {wrong} are not layer indices of a {num_layers}-layer model (0..{num_layers - 1})."
                    )
                if len(set(self.skip_layers)) >= num_layers:
                    bad("skip_layers must leave at least one layer to run.")
            self.num_skipped(num_layers)

    def __post_init__(self) -> None:
        self.validate()
