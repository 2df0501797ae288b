"""Which Hugging Face decoder families the runner can drive, and the little their top-level forward adds.

The runner calls a model's own modules: ``model.model.embed_tokens``, each of ``model.model.layers``,
``model.model.norm``, ``model.model.rotary_emb`` and ``model.lm_head``. A few families do one more thing
in their top-level ``forward`` between those modules; those steps are named here, per configuration
attribute, and applied exactly as the family's own code applies them (same operation, same dtype):

- ``embedding_multiplier`` (Granite): embeddings times a constant;
- ``logits_scaling`` (Granite): logits divided by a constant; ``logit_scale`` (Cohere): multiplied;
- ``final_logit_softcapping`` (Gemma-2, Gemma-3): ``tanh(logits / c) * c``.

A family that needs something else shows it in the tests, which compare the runner's logits with the
model's own for every family listed in docs (tests/test_families.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .errors import UnsupportedModelError

ATTENTION_LAYER_TYPES = frozenset({"full_attention", "sliding_attention", "chunked_attention"})
"""Layer types whose state is a KV cache written by position (``chunked_attention`` is refused below
until it is tested; it is listed so that the message can say what it is)."""
SUPPORTED_LAYER_TYPES = frozenset({"full_attention", "sliding_attention"})


@dataclass
class ModelParts:
    """The modules of a decoder-only LM the runner drives, and what its forward adds around them."""

    embed: nn.Module
    layers: nn.ModuleList
    norm: nn.Module
    rotary: nn.Module
    head: nn.Module
    embedding_multiplier: float | None = None
    logits_transform: Callable[[torch.Tensor], torch.Tensor] | None = None


def _logits_transform(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    config = model.config
    steps: list[Callable[[torch.Tensor], torch.Tensor]] = []
    scaling = getattr(config, "logits_scaling", None)
    if scaling not in (None, 1, 1.0):
        steps.append(lambda x: x / scaling)
    scale = getattr(model, "logit_scale", None)
    if isinstance(scale, (int, float)) and scale != 1:
        steps.append(lambda x: x * scale)
    cap = getattr(config, "final_logit_softcapping", None)
    if cap:
        steps.append(lambda x: torch.tanh(x / cap) * cap)
    if not steps:
        return None

    def transform(x: torch.Tensor) -> torch.Tensor:
        for step in steps:
            x = step(x)
        return x

    return transform


def model_parts(model: nn.Module) -> ModelParts:
    """The parts of ``model``, or :class:`UnsupportedModelError` naming what is missing."""
    decoder = getattr(model, "model", None)
    missing = [name for name in ("model", "lm_head") if getattr(model, name, None) is None]
    if decoder is not None:
        missing += [
            f"model.{n}" for n in ("embed_tokens", "layers", "norm", "rotary_emb") if getattr(decoder, n, None) is None
        ]
    if missing:
        raise UnsupportedModelError(
            f"{type(model).__name__} is not supported: CLaSp drives decoder-only models laid out as "
            f"model.model.{{embed_tokens, layers, norm, rotary_emb}} and model.lm_head "
            f"(LLaMA, Qwen2/3, Mistral, Gemma-2/3 and the families in the README), and this one lacks "
            f"{', '.join(missing)}."
        )
    multiplier = getattr(decoder, "embedding_multiplier", None)
    return ModelParts(
        decoder.embed_tokens,
        decoder.layers,
        decoder.norm,
        decoder.rotary_emb,
        model.lm_head,
        float(multiplier) if multiplier not in (None, 1, 1.0) else None,
        _logits_transform(model),
    )


def check_supported(model: nn.Module) -> None:
    """Raise :class:`UnsupportedModelError` with a clear sentence if the runner cannot drive ``model``."""
    config = model.config
    name = type(model).__name__
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(f"{name} is an encoder-decoder model; CLaSp needs a decoder-only LM.")
    model_parts(model)
    kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
    if not kinds <= SUPPORTED_LAYER_TYPES:
        other = sorted(kinds - SUPPORTED_LAYER_TYPES)
        what = (
            "attention layers of a kind not tested here"
            if set(other) <= ATTENTION_LAYER_TYPES
            else "layers that keep a recurrent state rather than a KV cache"
        )
        raise UnsupportedModelError(
            f"{name} has {what} ({', '.join(other)}); CLaSp can skip and cache only full and "
            "sliding-window attention layers."
        )
