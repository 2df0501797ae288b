"""The drafting interface: what the decoding loop asks of a drafter, and what it gets back.

A drafter proposes tokens each round and watches how many were accepted. It never writes the
generation's statistics: it returns what it did (:class:`Draft`, :class:`Selection`) and the loop
records it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from ..config import GenerationConfig
    from ..state import DecodeState, ModelState


class Source(str, Enum):
    """Where a round's draft came from (the values are what statistics and benchmark records show)."""

    PLAIN = "plain"  # nothing drafted: a plain decoding step
    LOOKUP = "pld"  # copied from an earlier match in the context (prompt lookup)
    LAYER_SKIP = "clasp"  # the model itself with some layers skipped
    SUFFIX = "suffix"  # what followed the context's last tokens in earlier requests (the suffix index)

    def __str__(self) -> str:
        return self.value


@dataclass
class Selection:
    """A skip set a drafter adopted, and the seconds choosing it took (0 for a fixed or remembered one)."""

    skip: tuple[int, ...]
    seconds: float = 0.0
    ran_dp: bool = False


@dataclass
class Draft:
    """Proposed tokens. ``probs`` holds the draft's warped distributions ``[k, V]`` when verification needs
    them (speculative sampling of a model's draft); ``None`` means a deterministic draft (one-hot ``q``).
    ``selection`` is a layer selection made while drafting."""

    tokens: list[int]
    source: Source = Source.PLAIN
    probs: torch.Tensor | None = None
    selection: Selection | None = None

    def __len__(self) -> int:
        return len(self.tokens)


@dataclass
class Outcome:
    """How a round went: ``accepted`` leading draft tokens were kept; ``hidden`` is ``[L + 1, k + 1, d]``
    from the verification when the drafter asked for it; ``verify_seconds`` is ``None`` when the pass was
    shared with other generations (a batch), so its time says nothing of this generation's own costs."""

    draft: Draft
    accepted: int
    hidden: torch.Tensor | None
    draft_seconds: float
    verify_seconds: float | None


class Drafter:
    """The interface. ``propose`` may run the model (writing scratch cache slots beyond the verified ones);
    ``observe`` sees each round's outcome after the cache was rolled back to the verified tokens."""

    def warm_up(self, model: ModelState, config: GenerationConfig) -> None:
        """One-time preparation of per-model state (measured costs, quantized weights), before the
        generation's cache is allocated."""

    def start(self, state: DecodeState, prompt_hidden: torch.Tensor | None) -> Selection | None:
        """Called once after the prefill, with the last prompt token's hidden states ``[L + 1, d]`` if
        :meth:`wants_prefill_hidden`."""
        return None

    def wants_prefill_hidden(self) -> bool:
        return False

    def wants_hidden(self, state: DecodeState) -> bool:
        """Whether the coming verification should return all layers' hidden states."""
        return False

    def propose(self, state: DecodeState, max_tokens: int) -> Draft:
        """At most ``max_tokens`` draft tokens. While ``state.solo`` is false (the generation shares each
        forward pass with others: a batch) the drafter must not run the model itself."""
        raise NotImplementedError

    def observe(self, state: DecodeState, outcome: Outcome) -> Selection | None:
        """Learn from a round; return a new skip set if one was chosen."""
        return None


class NoDraft(Drafter):
    """Plain autoregressive decoding through the same loop."""

    def propose(self, state: DecodeState, max_tokens: int) -> Draft:
        return Draft([])
