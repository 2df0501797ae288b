"""The state of one generation, as the decoding loop and the drafters see it."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .config import GenerationConfig
from .kv_cache import KVCache
from .runner import ModelRunner
from .sampling import SamplingParams
from .stats import GenerationStats


@dataclass
class Session:
    """One generation in flight.

    Invariant between rounds: the cache holds every token of ``tokens`` except the last one, which is the
    next round's first input (``cache.length == len(tokens) - 1``).
    """

    runner: ModelRunner
    cache: KVCache
    config: GenerationConfig
    eos_ids: frozenset[int]
    tokens: list[int]
    prompt_len: int
    generator: torch.Generator | None = None
    stats: GenerationStats = field(default_factory=GenerationStats)
    round: int = 0
    draft_seconds: float = 0.0  # this round's drafting time, for drafters that adapt to cost
    verify_seconds: float = 0.0  # this round's verification time

    @property
    def params(self) -> SamplingParams:
        return self.config.sampling

    @property
    def last_token(self) -> int:
        return self.tokens[-1]

    @property
    def position(self) -> int:
        """Position of the last token, the next round's first input."""
        return self.cache.length

    @property
    def generated(self) -> int:
        return len(self.tokens) - self.prompt_len
