"""The draft's reduced head: logits over part of the vocabulary, which makes a draft step cheaper."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


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
