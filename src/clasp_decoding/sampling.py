"""From logits to tokens: warping, greedy and speculative acceptance, residual sampling.

The same :func:`warp` (temperature, then top-k, then top-p, as ``transformers`` orders them) is applied
to the draft's and the target's logits, so speculative sampling (Leviathan et al., 2023) returns tokens
distributed exactly as plain sampling from the warped target would.

Each acceptance function costs one device-to-host transfer: the number of accepted drafts and the next
token travel together.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """Temperature 0 means greedy. ``top_k=0`` and ``top_p=1`` switch those filters off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def warp(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Float32 probabilities ``[..., V]`` after temperature, top-k and top-p."""
    logits = logits.float() / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        drop_sorted = mass_before >= params.top_p  # keep the smallest head whose mass reaches top_p
        drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row of ``probs`` (``[n, V]`` -> ``[n]``)."""
    return torch.multinomial(probs, 1, generator=generator).view(-1)


def pick(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """The next token for each row of ``logits``: argmax when greedy, else a sample."""
    if params.greedy:
        return logits.argmax(dim=-1)
    return sample(warp(logits, params), generator)


def greedy_accept(draft: torch.Tensor, target_logits: torch.Tensor) -> tuple[int, int]:
    """Greedy verification. ``draft`` ``[k]``, ``target_logits`` ``[k + 1, V]``.

    Returns ``(a, token)``: the number of leading drafts equal to the target's argmax, and the target's
    token after them (the correction, or the bonus token when all ``k`` match).
    """
    target = target_logits.argmax(dim=-1)
    k = draft.shape[0]
    agree = (draft == target[:k]).long().cumprod(0).sum() if k else target.new_zeros(())
    both = torch.stack([agree, target[agree]]).tolist()  # the one host sync
    return int(both[0]), int(both[1])


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``norm(max(p - q, 0))``: what to sample from after a rejection. Falls back to ``p`` if ``p == q``."""
    r = (p - q).clamp_min_(0.0)
    total = r.sum(-1, keepdim=True)
    return torch.where(total > 0, r / total.clamp_min(1e-30), p)


def speculative_accept(
    draft: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_probs: torch.Tensor,
    generator: torch.Generator | None,
) -> tuple[int, int]:
    """Speculative sampling. ``draft`` ``[k]``; ``draft_probs`` ``[k, V]`` (the draft's warped
    distributions), or ``None`` for a deterministic draft (prompt lookup: ``q`` is one-hot);
    ``target_probs`` ``[k + 1, V]``.

    Draft ``i`` is accepted with probability ``min(1, p_i(x_i) / q_i(x_i))``; at the first rejection the
    next token comes from ``norm(max(p - q, 0))``; if all are accepted, from ``p_k``.
    Returns ``(a, token)`` like :func:`greedy_accept`.
    """
    k = draft.shape[0]
    if k == 0:
        return 0, int(sample(target_probs[:1], generator)[0])
    idx = torch.arange(k, device=draft.device)
    p_x = target_probs[idx, draft]
    if draft_probs is None:
        q = torch.nn.functional.one_hot(draft, target_probs.shape[-1]).to(target_probs.dtype)
    else:
        q = draft_probs
    q_x = q[idx, draft]
    u = torch.rand(k, generator=generator, device=draft.device)
    accept = u * q_x < p_x  # u < p/q without dividing by a tiny q
    a = int(accept.long().cumprod(0).sum())
    if a == k:
        return k, int(sample(target_probs[k : k + 1], generator)[0])
    fix = residual(target_probs[a], q[a])
    return a, int(sample(fix[None], generator)[0])
