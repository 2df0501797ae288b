"""What a drafter sees of one generation in flight, and the per-model state that outlives it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import GenerationConfig
    from .kv_cache import KVCache
    from .runner import ModelRunner
    from .sampling import Sampler


@dataclass
class ModelState:
    """Everything kept per model (not per generation): its runner and what drafters learned about it on
    this machine (the controller's estimates, the last skip sets, quantized draft weights, measured
    costs). It changes speed, never output. Owned by the model registry in :mod:`.context`."""

    runner: ModelRunner
    learned: dict[Any, Any] = field(default_factory=dict)

    def remember(self, key: Any, make):
        """The value stored under ``key``, made by ``make()`` on first use."""
        if key not in self.learned:
            self.learned[key] = make()
        return self.learned[key]


@dataclass
class DecodeState:
    """One generation as the decoding loop and the drafters see it.

    Invariant between rounds: the cache holds every token of ``tokens`` except the last one, which is the
    next round's first input (``cache.length == len(tokens) - 1``). Drafters read it and may write cache
    slots beyond ``cache.length`` (scratch); everything else belongs to the loop.
    """

    runner: ModelRunner
    cache: KVCache
    config: GenerationConfig
    sampler: Sampler
    eos_ids: frozenset[int]
    tokens: list[int]
    prompt_len: int
    model: ModelState
    round: int = 0
    solo: bool = True  # the generation has the runner to itself: drafts may run the model (not in a batch)

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
