"""The drafting methods by name: what the command line, the server, the configuration and the benchmark
offer, and how each name becomes a :class:`~.base.Drafter`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..config import METHOD_NAMES, GenerationConfig
from .base import Drafter, NoDraft
from .hybrid import HybridDrafter
from .layer_skip import LayerSkipDrafter
from .lookup import PromptLookupDrafter, SuffixDrafter


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    make: Callable[[GenerationConfig], Drafter]
    layer_skip: bool  # whether it drafts by skipping layers (so layer-skip options apply)
    lookup: bool  # whether it drafts by prompt lookup


def _clasp(config: GenerationConfig) -> Drafter:
    return HybridDrafter(use_lookup=False) if config.adaptive else LayerSkipDrafter(dynamic=True)


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            "hybrid",
            "prompt lookup, CLaSp's layer skip or plain decoding, chosen each round by measured cost (default)",
            lambda c: HybridDrafter(),
            layer_skip=True,
            lookup=True,
        ),
        Method("clasp", "CLaSp: layer skip re-chosen by the dynamic program (the paper's method)", _clasp, True, False),
        Method("static", "a fixed skip set", lambda c: LayerSkipDrafter(dynamic=False), True, False),
        Method("pld", "prompt lookup decoding", lambda c: PromptLookupDrafter(), False, True),
        Method(
            "suffix",
            "drafts from earlier requests' prompts and outputs (the shared suffix index)",
            lambda c: SuffixDrafter(),
            False,
            True,
        ),
        Method("ar", "plain autoregressive decoding through the same loop", lambda c: NoDraft(), False, False),
    )
}
"""Every drafting method, the default first."""

if tuple(METHODS) != METHOD_NAMES:  # the configuration's vocabulary and this table must agree
    raise ImportError(f"drafting methods {tuple(METHODS)} differ from config.METHOD_NAMES {METHOD_NAMES}")


def make_drafter(config: GenerationConfig) -> Drafter:
    """The drafter ``config.method`` names (a fresh one: drafters hold one generation's state)."""
    return METHODS[config.method].make(config)
