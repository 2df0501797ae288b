"""Drive a Hugging Face causal LM's own modules layer by layer over the project's KV cache.

Nothing of the model's maths is copied here: the runner calls the model's embedding, rotary embedding,
decoder layers, final norm and head, and only builds what the model's top-level ``forward`` would have
built around them (position ids, attention masks, and the few family-specific steps of
:mod:`.families`). That is what lets it

- run any subset of layers (a layer-skip draft), or stand-in modules for some layers (a quantized draft),
- return every layer's hidden state (the input of CLaSp's layer selection), and
- run one layer on several candidate states side by side at one position (the DP's sequence-parallel
  call), each candidate seeing the verified context and itself, without touching verified cache slots.

Layers may sit on several devices (``load(..., device_map=...)``): hidden states move to each layer's
device, masks and rotary tables are made once per device and call, and each layer's cache lives on its
device.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Sequence

import torch
from torch import nn

from .draft_head import VocabSubset
from .errors import InputError
from .families import check_supported, model_parts
from .kv_cache import BatchCache, KVCache
from .numerics import BatchRows, RowSpec, Segment, install

AS_GIVEN = RowSpec(0, "masked")
"""How a runner that is not row-exact asks the attention wrapper for its own masks, as given."""


def module_device(module: nn.Module) -> torch.device:
    """Where ``module`` computes: its ``accelerate`` execution device if dispatched, else its weights'."""
    hook = getattr(module, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    if device is not None:
        return torch.device(device if not isinstance(device, int) else f"cuda:{device}")
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


class ModelRunner:
    """Runs a model's modules over a :class:`KVCache`: forward passes, layer subsets, DP candidates."""

    def __init__(self, model: nn.Module) -> None:
        check_supported(model)
        self._model = weakref.ref(model)  # the model registry's entry must not keep its own key alive
        self.config = model.config
        parts = model_parts(model)
        self.embed, self.layers, self.norm, self.rotary, self.head = (
            parts.embed,
            parts.layers,
            parts.norm,
            parts.rotary,
            parts.head,
        )
        self.embedding_multiplier = parts.embedding_multiplier
        self.logits_transform = parts.logits_transform
        self.num_layers = len(self.layers)
        self.all_layers: tuple[int, ...] = tuple(range(self.num_layers))
        self.layer_types: list[str] = list(
            getattr(self.config, "layer_types", None) or ["full_attention"] * self.num_layers
        )
        window = getattr(self.config, "sliding_window", None)
        self.sliding_window: int | None = window if "sliding_attention" in self.layer_types else None
        self.max_positions: int = int(getattr(self.config, "max_position_embeddings", 1 << 30))
        self.vocab_size: int = (
            int(self.head.weight.shape[0]) if hasattr(self.head, "weight") else self.config.vocab_size
        )
        self._rotary_typed = "layer_type" in inspect.signature(self.rotary.forward).parameters
        layer_params = inspect.signature(self.layers[0].forward).parameters
        self._cache_kw = "cache" if "cache" in layer_params else "past_key_values"
        self._neg = torch.finfo(self.dtype).min
        self.layer_devices = [module_device(layer) for layer in self.layers]
        self.embed_device = module_device(self.embed)
        self.single_device = len({*self.layer_devices, self.embed_device, self.device}) == 1
        self.numerics = install(model)
        self.row_exact = self.numerics.attention_rowwise
        self.wrapped_attention = self.numerics.attention_rowwise  # the project's attention wrapper is installed

    @property
    def model(self) -> nn.Module | None:
        """The model this runner drives (``None`` once the user has dropped it)."""
        return self._model()

    @property
    def device(self) -> torch.device:
        """Where logits (and the tensors the decoding loop keeps) live: the head's device."""
        return module_device(self.head)

    @property
    def dtype(self) -> torch.dtype:
        return self.head.weight.dtype

    # ------------------------------------------------------------------ capacity and caches

    def scratch_slots(self) -> int:
        """Cache slots needed beyond the verified tokens: a layer selection's candidates (at most one per
        layer) after the last verified token."""
        return self.num_layers + 2

    def check_fits(self, prompt_len: int, max_new_tokens: int) -> None:
        """Refuse an empty prompt or one that, with ``max_new_tokens``, does not fit: the rule
        :meth:`new_cache` allocates by."""
        if prompt_len == 0:
            raise InputError("The prompt is empty: give at least one token.")
        limit = self.max_positions
        if prompt_len >= limit:
            raise InputError(f"The prompt has {prompt_len} tokens, but the model's context holds {limit}.")
        if prompt_len + max_new_tokens > limit:
            raise InputError(
                f"The prompt ({prompt_len} tokens) plus max_new_tokens ({max_new_tokens}) exceeds the model's "
                f"context of {limit} tokens; ask for at most {limit - prompt_len} new tokens."
            )

    def new_cache(self, prompt_len: int, max_new_tokens: int) -> KVCache:
        """A cache for one generation: the prompt, the new tokens and the scratch slots."""
        self.check_fits(prompt_len, max_new_tokens)
        return KVCache(self.num_layers, prompt_len + max_new_tokens + self.scratch_slots(), self.dtype)

    def release_cache(self, cache: KVCache) -> None:
        """A generation is done with ``cache`` (nothing to do: each generation has its own)."""

    max_rows: int | None = None
    """The most query rows one call may have (``None``: any); the graph runner's largest bucket."""

    def prepare(self, modules: Sequence[nn.Module] | None = None) -> int:
        """Get ready to run ``modules`` (stand-in layers) or the model itself, outside any timed round. The
        eager runner has nothing to prepare; the graph runner captures its graphs here."""
        return 0

    # ------------------------------------------------------------------ building blocks

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(tokens.to(self.embed_device))
        if self.embedding_multiplier is not None:
            hidden = hidden * self.embedding_multiplier
        return hidden

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
            masks[kind] = torch.zeros(allowed.shape, dtype=self.dtype, device=visible.device).masked_fill_(
                ~allowed, self._neg
            )[None, None]
        return masks

    def _run_layer(
        self,
        layer: nn.Module,
        hidden: torch.Tensor,
        mask: torch.Tensor | None,
        position_embeddings,
        position_ids: torch.Tensor,
        cache: KVCache,
        plan: RowSpec,
    ) -> torch.Tensor:
        # Not row-exact (the graph runner's batched attention): the attention wrapper takes the mask as given.
        extra = {"clasp_rows": plan if self.row_exact else AS_GIVEN} if self.wrapped_attention else {}
        out = layer(
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
        ids only, in its order, when given). Family steps run in the model's dtype, as its forward does."""
        hidden = hidden.to(module_device(self.norm))
        normed = self.norm(hidden)
        logits = self.head(normed) if vocab is None else vocab.project(normed.to(vocab.weight.device))
        if self.logits_transform is not None:
            logits = self.logits_transform(logits)
        return logits.float()

    def _placed(self, device: torch.device, tensors: dict, cache: dict) -> dict:
        """``tensors`` (a dict of tensors or tensor pairs) on ``device``, converted once per call."""
        if device not in cache:
            cache[device] = {
                k: (None if v is None else tuple(t.to(device) for t in v) if isinstance(v, tuple) else v.to(device))
                for k, v in tensors.items()
            }
        return cache[device]

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
        modules: Sequence[nn.Module] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run ``tokens`` (``[q]``, positions ``start .. start+q-1``) through ``layers`` (default: all).

        Writes the K/V of every layer run at slots ``start ..`` and attends to slots ``[0, start + q)``.
        Returns float32 logits (``[q, V]``, or ``[1, V]`` with ``last_only``) and, with
        ``collect_hidden``, the pre-norm hidden states ``[L + 1, q, d]`` (index 0: embeddings; only the
        last row with ``last_only``). With ``vocab`` the logits cover that subset of the vocabulary; with
        ``modules``, layer ``i`` runs as ``modules[i]`` (a stand-in sharing the layer's cache slot).
        """
        q = tokens.shape[-1]
        end = start + q
        cache.route(start, q, end)
        hidden = self._embed(tokens.view(1, q))
        dev = hidden.device
        position_ids = torch.arange(start, end, device=dev)[None]
        pe = self._rotary(hidden, position_ids)
        masks: dict[str, torch.Tensor | None]
        if q == 1 and (self.sliding_window is None or end <= self.sliding_window):
            masks = dict.fromkeys(self.layer_types)  # a single query sees every slot up to itself
        else:
            q_pos = position_ids[0]
            kv_pos = torch.arange(end, device=dev)
            masks = self._masks(kv_pos[None, :] <= q_pos[:, None], q_pos, kv_pos)

        def kept(h: torch.Tensor) -> torch.Tensor:  # a prefill keeps its last row's states only (a copy, so
            return h[0, -1:].clone() if last_only else h[0]  # the layer's whole output is not held)

        states = [kept(hidden)] if collect_hidden else None
        plans = {
            kind: RowSpec(start, "causal", self.sliding_window if kind == "sliding_attention" else None)
            for kind in masks
        }
        placed: dict = {}
        for i in self.all_layers if layers is None else layers:
            kind = self.layer_types[i]
            mask, pos_emb, pos_ids = masks[kind], pe[kind], position_ids
            if not self.single_device and self.layer_devices[i] != hidden.device:
                hidden = hidden.to(self.layer_devices[i])
            if hidden.device != dev:
                on = self._placed(
                    hidden.device, {"m": mask, "pe": pos_emb, "ids": pos_ids}, placed.setdefault(kind, {})
                )
                mask, pos_emb, pos_ids = on["m"], on["pe"], on["ids"]
            layer = self.layers[i] if modules is None else modules[i]
            hidden = self._run_layer(layer, hidden, mask, pos_emb, pos_ids, cache, plans[kind])
            if states is not None:
                states.append(kept(hidden) if self.single_device else kept(hidden).to(self.device))
        out = hidden[0, -1:] if last_only else hidden[0]
        return self.logits(out, vocab), (torch.stack(states) if states is not None else None)

    @property
    def batchable(self) -> bool:
        """Whether :meth:`forward_batch` can run this model: one device, its attention the row-exact sdpa
        wrapper and the project's kernels (which attend each generation's rows over its own cache; the
        linear mode "kernel" says they were built)."""
        return (
            self.row_exact
            and self.single_device
            and self.device.type == "cpu"
            and self.config._attn_implementation == "clasp_sdpa"
            and self.numerics.linear_mode == "kernel"
        )

    @torch.inference_mode()
    def forward_batch(self, segments: Sequence[tuple[KVCache, Sequence[int], int, bool]]) -> list[torch.Tensor]:
        """One pass over several generations' rows: ``(cache, tokens, start, last_only)`` each, the tokens
        at positions ``start ..`` of that generation (a prompt from 0, or a verification's last token and
        drafts). Each generation's K/V go to its own cache and its rows attend only to it; linear layers
        run all rows together, and their kernels are row-invariant, so every row's logits are the bits it
        would have alone. Returns float32 logits per generation (its last row only with ``last_only``)."""
        tokens = [t for _, toks, _, _ in segments for t in toks]
        positions = [start + i for _, toks, start, _ in segments for i in range(len(toks))]
        q = len(tokens)
        ids = torch.tensor(tokens, device=self.embed_device).view(1, q)
        hidden = self._embed(ids)
        position_ids = torch.tensor(positions, device=hidden.device)[None]
        pe = self._rotary(hidden, position_ids)
        spans = tuple(Segment(cache, start, len(toks)) for cache, toks, start, _ in segments)
        plans = {
            kind: BatchRows(spans, self.sliding_window if kind == "sliding_attention" else None)
            for kind in set(self.layer_types)
        }
        writes = BatchCache([(cache, start, len(toks)) for cache, toks, start, _ in segments])
        for i in self.all_layers:
            kind = self.layer_types[i]
            hidden = self._run_layer(self.layers[i], hidden, None, pe[kind], position_ids, writes, plans[kind])
        keep, ends, at = [], [], 0
        for _, toks, _, last_only in segments:
            rows = range(at + len(toks) - 1, at + len(toks)) if last_only else range(at, at + len(toks))
            keep.extend(rows)
            ends.append(len(keep))
            at += len(toks)
        logits = self.logits(hidden[0, keep])
        return [logits[a:b] for a, b in zip([0, *ends[:-1]], ends, strict=True)]

    @torch.inference_mode()
    def layer_candidates(
        self, cache: KVCache, index: int, states: torch.Tensor, position: int, module: nn.Module | None = None
    ) -> torch.Tensor:
        """Run layer ``index`` (or its stand-in ``module``, a quantized draft's copy) on ``n`` candidate
        states ``[n, d]`` of the token at ``position``.

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
        dev = self.layer_devices[index]
        first = position + 1
        read_len = first + n
        cache.route(first, n, read_len)
        position_ids = torch.full((1, n), position, device=dev, dtype=torch.long)
        hidden = states.to(dev).view(1, n, -1)
        kind = self.layer_types[index]
        pe = self._rotary(hidden, position_ids)[kind]
        kv = torch.arange(read_len, device=dev)
        own = kv[None, :] == torch.arange(first, read_len, device=dev)[:, None]
        visible = own | (kv[None, :] < position)
        kv_pos = torch.where(kv >= first, torch.full_like(kv, position), kv)
        mask = self._masks(visible, position_ids[0], kv_pos)[kind]
        plan = RowSpec(position, "masked")
        layer = self.layers[index] if module is None else module
        out = self._run_layer(layer, hidden, mask, pe, position_ids, cache, plan)[0]
        return out.to(states.device)
