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

    PER_KIND = 8
    """Values kept per kind of tuple key (``("controller", ...)``, ``("draft_head", ...)``: one per
    configuration a client may ask for), least recently used out: a server's clients cannot grow them."""

    def remember(self, key: Any, make):
        """The value stored under ``key``, made by ``make()`` on first use (and kept most recently used)."""
        if key in self.learned:
            value = self.learned.pop(key)
        else:
            value = make()
            if isinstance(key, tuple) and key:
                same = [k for k in self.learned if isinstance(k, tuple) and k and k[0] == key[0]]
                for old in same[: max(0, len(same) - self.PER_KIND + 1)]:
                    del self.learned[old]
        self.learned[key] = value
        return value


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
    suffix: Any = None  # the shared suffix index this generation drafts from and adds to (or None)
    scope: Any = None  # whose history in it this generation may use (its API key; None for a lone user)

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
