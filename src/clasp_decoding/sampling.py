"""From logits to tokens: warping, and the three ways a round's drafts are verified.

- **greedy**: a draft token is accepted when it is the target's argmax.
- **position-keyed sampling** (:mod:`.noise`): the target's token at each index is an exponential race
  whose noise depends on (seed, index) alone; a draft token is accepted when it equals that token. The
  output is exactly the text plain decoding with the same seed produces, whatever was drafted.
- **speculative sampling** (Leviathan et al., 2023): draft ``x`` is accepted with probability
  ``min(1, p(x) / q(x))``; at the first rejection the next token comes from ``norm(max(p - q, 0))``.

The same :func:`warp` (temperature, then top-k, then top-p, as ``transformers`` orders them) is applied
to the draft's and the target's logits, so every rule samples the warped target exactly.
Each acceptance costs one device-to-host transfer: the accepted count and the next token travel together.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .noise import race

GREEDY_BELOW = 1e-5
"""Temperatures below this mean greedy decoding (as vLLM does): dividing logits by them overflows."""


@dataclass(frozen=True)
class SamplingParams:
    """Temperature 0 means greedy. ``top_k=0`` and ``top_p=1`` switch those filters off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


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


def prefix_accept(draft: torch.Tensor, target: torch.Tensor) -> tuple[int, int]:
    """Accept the drafts that equal the target's tokens. ``draft`` ``[k]``, ``target`` ``[k + 1]``.

    Returns ``(a, token)``: the number of leading drafts equal to the target's, and the target's token
    after them (the correction, or the bonus token when all ``k`` match).
    """
    k = draft.shape[0]
    agree = (draft == target[:k]).long().cumprod(0).sum() if k else target.new_zeros(())
    both = torch.stack([agree, target[agree]]).tolist()  # the one host sync
    return int(both[0]), int(both[1])


def greedy_accept(draft: torch.Tensor, target_logits: torch.Tensor) -> tuple[int, int]:
    """Greedy verification against ``target_logits`` ``[k + 1, V]``."""
    return prefix_accept(draft, target_logits.argmax(dim=-1))


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
    ``target_probs`` ``[k + 1, V]``. Returns ``(a, token)`` like :func:`prefix_accept`.

    Both possible next tokens (the bonus token after ``k`` acceptances, the residual's sample at the
    first rejection) are drawn on the device and the right one picked there: one host transfer per
    round. (The unused one is an independent draw, so it changes nothing in the law.)"""
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
    a = accept.long().cumprod(0).sum()
    row = a.clamp(max=k - 1)
    fix = residual(target_probs.index_select(0, row.view(1)), q.index_select(0, row.view(1)))
    rejected = sample(fix, generator)[0]
    bonus = sample(target_probs[k : k + 1], generator)[0]
    both = torch.stack([a, torch.where(a == k, bonus, rejected)]).tolist()
    return int(both[0]), int(both[1])


class Sampler:
    """How one generation turns logits into tokens, for the target and for drafts.

    ``mode`` is ``"greedy"``, ``"keyed"`` (position-keyed sampling with ``seed``) or ``"speculative"``
    (speculative sampling with a torch generator seeded from ``seed``). Token *indices* are positions
    in the whole sequence (prompt included): row ``r`` of a call starting at ``index`` chooses the token
    at ``index + r``. Until ``min_length`` tokens exist, end-of-sequence ids cannot be chosen.
    """

    def __init__(
        self,
        params: SamplingParams,
        *,
        mode: str,
        seed: int = 0,
        device: torch.device | str = "cpu",
        eos_ids: frozenset[int] = frozenset(),
        min_length: int = 0,
    ) -> None:
        if mode not in ("greedy", "keyed", "speculative"):
            raise ValueError(f"unknown sampling mode {mode!r}")
        self.params, self.mode, self.seed = params, mode, seed
        self.generator: torch.Generator | None = None
        if mode == "speculative":
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(seed)
        self.min_length = min_length
        self.eos_ids = frozenset(eos_ids)
        self.device = device
        self._eos_columns: dict = {}

    def _eos_in(self, width: int, vocab=None) -> torch.Tensor | None:
        """Columns of end-of-sequence ids in logits of ``width`` ids (over ``vocab``'s ids when given, a
        reduced or quantized draft head), made once per width or head: no host sync per call."""
        key = width if vocab is None else id(vocab)
        if key not in self._eos_columns:
            if vocab is None:
                cols = sorted(i for i in self.eos_ids if 0 <= i < width)
            else:
                ids = vocab.ids.tolist()
                cols = [j for j, i in enumerate(ids) if i in self.eos_ids]
            made = torch.tensor(cols, dtype=torch.long, device=self.device) if cols else None
            self._eos_columns[key] = (made, vocab)  # the head is kept alive so its id is not reused
        return self._eos_columns[key][0]

    @property
    def needs_draft_probs(self) -> bool:
        """Whether verification needs the draft's distributions (speculative sampling only)."""
        return self.mode == "speculative"

    def _suppress(self, logits: torch.Tensor, index: int, vocab=None) -> torch.Tensor:
        """Mask end-of-sequence ids on rows whose token index is below ``min_length`` (row ``r`` of
        ``logits`` is index ``index + r``); ``vocab`` maps the columns of a draft head's logits to ids."""
        rows = min(logits.shape[0], self.min_length - index)
        if rows <= 0 or not self.eos_ids:
            return logits
        cols = self._eos_in(logits.shape[-1], vocab)
        if cols is None:
            return logits
        logits = logits.clone()
        logits[:rows, cols] = float("-inf")
        return logits

    def choose(self, logits: torch.Tensor, index: int) -> torch.Tensor:
        """The target's token for each row of ``logits`` ``[n, V]`` (one random draw per row)."""
        logits = self._suppress(logits, index)
        if self.mode == "greedy":
            return logits.argmax(-1)
        probs = warp(logits, self.params)
        if self.mode == "keyed":
            return race(probs, self.seed, index)
        return sample(probs, self.generator)

    def accept(
        self, draft: torch.Tensor, draft_probs: torch.Tensor | None, logits: torch.Tensor, index: int
    ) -> tuple[int, int]:
        """Verify ``draft`` ``[k]`` against the target's ``logits`` ``[k + 1, V]``; row 0 chooses the
        token at ``index``. Returns the accepted count and the target's next token."""
        if self.mode == "speculative":
            return speculative_accept(
                draft, draft_probs, warp(self._suppress(logits, index), self.params), self.generator
            )
        return prefix_accept(draft, self.choose(logits, index))

    def propose(
        self, logits: torch.Tensor, index: int, vocab=None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """A draft's token at ``index`` from its logits ``[V']``, over the reduced vocabulary ``vocab`` (a
        :class:`~.draft_head.VocabSubset`) when given. Returns the token id (full vocabulary), the
        draft's confidence (its top probability) and, for speculative sampling, its distribution over
        the full vocabulary."""
        logits = self._suppress(logits[None], index, vocab)[0]
        if self.mode == "greedy":
            conf, token = torch.softmax(logits, -1).max(0)
            return (token if vocab is None else vocab.ids[token]), conf, None
        q = warp(logits, self.params)
        full = q if vocab is None else vocab.to_full(q)
        if self.mode == "keyed":
            return race(full[None], self.seed, index)[0], q.max(), None
        token = sample(q[None], self.generator)[0]
        return (token if vocab is None else vocab.ids[token]), q.max(), full
