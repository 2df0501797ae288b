"""Drive a Hugging Face causal LM's own modules layer by layer over the project's KV cache.

Nothing of the model's maths is copied here: the runner calls the model's embedding, rotary embedding,
decoder layers, final norm and head, and only builds what the model's top-level ``forward`` would have
built around them (position ids and attention masks). That is what lets it

- run any subset of layers (a layer-skip draft),
- return every layer's hidden state (the input of CLaSp's layer selection), and
- run one layer on several candidate states side by side at one position (the DP's sequence-parallel
  call), each candidate seeing the verified context and itself, without touching verified cache slots.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .errors import UnsupportedModelError
from .kv_cache import KVCache
from .numerics import RowPlan, install

SUPPORTED_LAYER_TYPES = {"full_attention", "sliding_attention"}


@dataclass
class ModelParts:
    """The modules of a decoder-only LM the runner drives."""

    embed: nn.Module
    layers: nn.ModuleList
    norm: nn.Module
    rotary: nn.Module
    head: nn.Module


def _parts(model: nn.Module) -> ModelParts:
    decoder = getattr(model, "model", None)
    missing = [name for name, owner in (("model", model), ("lm_head", model)) if getattr(owner, name, None) is None]
    if decoder is not None:
        missing += [n for n in ("embed_tokens", "layers", "norm", "rotary_emb") if getattr(decoder, n, None) is None]
    if missing:
        raise UnsupportedModelError(
            f"{type(model).__name__} is not supported: CLaSp drives decoder-only models laid out as "
            f"model.model.{{embed_tokens, layers, norm, rotary_emb}} and model.lm_head "
            f"(LLaMA, Qwen2/3, Mistral, Gemma-3 and similar), and this one lacks {', '.join(missing)}."
        )
    return ModelParts(decoder.embed_tokens, decoder.layers, decoder.norm, decoder.rotary_emb, model.lm_head)


def check_supported(model: nn.Module) -> None:
    """Raise :class:`UnsupportedModelError` with a clear sentence if the runner cannot drive ``model``."""
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(
            f"{type(model).__name__} is an encoder-decoder model; CLaSp needs a decoder-only LM."
        )
    _parts(model)
    kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
    if not kinds <= SUPPORTED_LAYER_TYPES:
        raise UnsupportedModelError(
            f"{type(model).__name__} has layer types {sorted(kinds - SUPPORTED_LAYER_TYPES)}; only attention "
            f"layers ({', '.join(sorted(SUPPORTED_LAYER_TYPES))}) can be skipped and cached here."
        )


class VocabSubset:
    """A draft head over part of the vocabulary: ids ``[0, limit)`` (a view of the head's weight, no copy;
    byte-pair vocabularies number their most frequent merges first) plus ``extra`` ids (the prompt's
    tokens, gathered once). Drafting with it is cheaper; verification still uses the full head, so the
    output is unchanged."""

    def __init__(self, head: nn.Module, limit: int, extra: Sequence[int] = ()) -> None:
        weight = head.weight
        vocab = weight.shape[0]
        limit = min(limit, vocab)
        extra_ids = sorted({int(i) for i in extra if limit <= int(i) < vocab})
        self.ids = torch.cat(
            [
                torch.arange(limit, device=weight.device),
                torch.tensor(extra_ids, dtype=torch.long, device=weight.device),
            ]
        )
        self.size = int(self.ids.shape[0])
        self.vocab_size = vocab
        bias = getattr(head, "bias", None)
        self.weight = weight[:limit]
        self.bias = bias[:limit] if bias is not None else None
        self.extra_weight = weight[extra_ids] if extra_ids else None
        self.extra_bias = bias[extra_ids] if bias is not None and extra_ids else None

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        out = torch.nn.functional.linear(hidden, self.weight, self.bias)
        if self.extra_weight is not None:
            out = torch.cat([out, torch.nn.functional.linear(hidden, self.extra_weight, self.extra_bias)], dim=-1)
        return out

    def to_full(self, probs: torch.Tensor) -> torch.Tensor:
        """Scatter ``[..., size]`` probabilities over the subset into ``[..., V]``."""
        full = probs.new_zeros(*probs.shape[:-1], self.vocab_size)
        return full.index_copy_(-1, self.ids, probs)


class ModelRunner:
    """Runs a model's modules over a :class:`KVCache`: forward passes, layer subsets, DP candidates."""

    def __init__(self, model: nn.Module) -> None:
        check_supported(model)
        self.model = model
        self.config = model.config
        parts = _parts(model)
        self.embed, self.layers, self.norm, self.rotary, self.head = (
            parts.embed,
            parts.layers,
            parts.norm,
            parts.rotary,
            parts.head,
        )
        self.num_layers = len(self.layers)
        self.all_layers: tuple[int, ...] = tuple(range(self.num_layers))
        self.layer_types: list[str] = list(
            getattr(self.config, "layer_types", None) or ["full_attention"] * self.num_layers
        )
        window = getattr(self.config, "sliding_window", None)
        self.sliding_window: int | None = window if "sliding_attention" in self.layer_types else None
        self.softcap: float | None = getattr(self.config, "final_logit_softcapping", None)
        self.max_positions: int = int(getattr(self.config, "max_position_embeddings", 1 << 30))
        self.vocab_size: int = (
            int(self.head.weight.shape[0]) if hasattr(self.head, "weight") else self.config.vocab_size
        )
        self._rotary_typed = "layer_type" in inspect.signature(self.rotary.forward).parameters
        layer_params = inspect.signature(self.layers[0].forward).parameters
        self._cache_kw = "cache" if "cache" in layer_params else "past_key_values"
        self._neg = torch.finfo(self.dtype).min
        self.numerics = install(model)
        self.row_exact = self.numerics.attention_rowwise

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.head.weight.dtype

    def new_cache(self, capacity: int) -> KVCache:
        return KVCache(self.num_layers, capacity, self.dtype, self.device)

    # ------------------------------------------------------------------ building blocks

    def _rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        if self._rotary_typed:
            return {t: self.rotary(hidden, position_ids, t) for t in set(self.layer_types)}
        pe = self.rotary(hidden, position_ids)
        return {t: pe for t in set(self.layer_types)}

    def _masks(
        self, visible: torch.Tensor, q_pos: torch.Tensor, kv_pos: torch.Tensor
    ) -> dict[str, torch.Tensor | None]:
        """Additive masks per layer type from a boolean ``visible[q, kv]`` and the positions of both sides."""
        masks: dict[str, torch.Tensor | None] = {}
        for kind in set(self.layer_types):
            allowed = visible
            if kind == "sliding_attention" and self.sliding_window is not None:
                allowed = allowed & (kv_pos[None, :] > q_pos[:, None] - self.sliding_window)
            masks[kind] = torch.zeros(allowed.shape, dtype=self.dtype, device=self.device).masked_fill_(
                ~allowed, self._neg
            )[None, None]
        return masks

    def _run_layer(
        self, index: int, hidden, mask, position_embeddings, position_ids, cache: KVCache, plan: RowPlan
    ) -> torch.Tensor:
        extra = {"clasp_rows": plan} if self.row_exact else {}
        out = self.layers[index](
            hidden,
            attention_mask=mask,
            position_embeddings=position_embeddings,
            position_ids=position_ids,
            **{self._cache_kw: cache},
            **extra,
        )
        return out[0] if isinstance(out, tuple) else out

    def logits(self, hidden: torch.Tensor, vocab: VocabSubset | None = None) -> torch.Tensor:
        """Final norm and head on ``[..., d]`` pre-norm hidden states; float32 logits (over ``vocab``'s
        ids only, in its order, when given)."""
        normed = self.norm(hidden)
        logits = (self.head(normed) if vocab is None else vocab.project(normed)).float()
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    # ------------------------------------------------------------------ the three calls

    @torch.inference_mode()
    def forward(
        self,
        cache: KVCache,
        tokens: torch.Tensor,
        start: int,
        *,
        layers: Sequence[int] | None = None,
        last_only: bool = False,
        collect_hidden: bool = False,
        vocab: VocabSubset | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run ``tokens`` (``[q]``, positions ``start .. start+q-1``) through ``layers`` (default: all).

        Writes the K/V of every layer run at slots ``start ..`` and attends to slots ``[0, start + q)``.
        Returns float32 logits (``[q, V]``, or ``[1, V]`` with ``last_only``) and, with
        ``collect_hidden``, the pre-norm hidden states ``[L + 1, q, d]`` (index 0: embeddings; only the
        last row with ``last_only``). With ``vocab`` the logits cover that subset of the vocabulary.
        """
        q = tokens.shape[-1]
        end = start + q
        cache.plan(start, q, end)
        position_ids = torch.arange(start, end, device=self.device)[None]
        hidden = self.embed(tokens.view(1, q))
        pe = self._rotary(hidden, position_ids)
        masks: dict[str, torch.Tensor | None]
        if q == 1 and (self.sliding_window is None or end <= self.sliding_window):
            masks = dict.fromkeys(self.layer_types)  # a single query sees every slot up to itself
        else:
            q_pos = position_ids[0]
            kv_pos = torch.arange(end, device=self.device)
            masks = self._masks(kv_pos[None, :] <= q_pos[:, None], q_pos, kv_pos)
        states = [hidden[0]] if collect_hidden else None
        plans = {
            kind: RowPlan(start, "causal", self.sliding_window if kind == "sliding_attention" else None)
            for kind in masks
        }
        for i in self.all_layers if layers is None else layers:
            kind = self.layer_types[i]
            hidden = self._run_layer(i, hidden, masks[kind], pe[kind], position_ids, cache, plans[kind])
            if states is not None:
                states.append(hidden[0])
        out = hidden[0, -1:] if last_only else hidden[0]
        if states is not None and last_only:
            states = [h[-1:] for h in states]
        return self.logits(out, vocab), (torch.stack(states) if states is not None else None)

    @torch.inference_mode()
    def layer_candidates(self, cache: KVCache, index: int, states: torch.Tensor, position: int) -> torch.Tensor:
        """Run layer ``index`` on ``n`` candidate states ``[n, d]`` of the token at ``position``.

        The candidates form a pseudo-sequence sharing one position id. Their K/V go to scratch slots
        ``position + 1 .. position + n`` (beyond the verified ones), and the mask lets candidate ``j``
        see the context ``[0, position)`` and its own slot only, so one call does the work of ``n``
        and the verified cache is never touched.
        """
        n = states.shape[0]
        if position + 1 < cache.length:
            raise ValueError(
                f"DP candidates at position {position} would overwrite verified cache slots "
                f"{position + 1}..{cache.length - 1}; run them on the last verified token"
            )
        first = position + 1
        read_len = first + n
        cache.plan(first, n, read_len)
        position_ids = torch.full((1, n), position, device=self.device, dtype=torch.long)
        hidden = states.view(1, n, -1)
        kind = self.layer_types[index]
        pe = self._rotary(hidden, position_ids)[kind]
        kv = torch.arange(read_len, device=self.device)
        own = kv[None, :] == torch.arange(first, read_len, device=self.device)[:, None]
        visible = own | (kv[None, :] < position)
        kv_pos = torch.where(kv >= first, torch.full_like(kv, position), kv)
        mask = self._masks(visible, position_ids[0], kv_pos)[kind]
        return self._run_layer(index, hidden, mask, pe, position_ids, cache, RowPlan(position, "masked"))[0]
