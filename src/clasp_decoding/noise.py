"""Position-keyed randomness: a sample from ``p`` whose noise depends on (seed, token index) alone.

Plain sampling draws random numbers in call order, so which drafts a round made changes every later
random draw. Here the randomness of the token at index ``i`` of the sequence is a fixed function of
``(seed, i)``: a target token is the winner of an *exponential race*, ``argmax_v p(v) / E_v`` with
``E_v ~ Exp(1)`` (the Gumbel-max trick in another form), which is an exact sample from ``p``. Any
drafter that proposes with the same noise, and a verifier that accepts a draft token exactly when it
equals the race's winner, then emit the very tokens plain decoding with that seed emits.

The race runs in two stages over fixed blocks of :data:`BLOCK` token ids: first a race of the blocks
(each block's mass against one exponential), then a race of the tokens inside the winning block. The
winning block has probability ``p(block)``, the winner inside it ``p(v) / p(block)``: an exact sample
again, but it needs ``V / BLOCK + BLOCK`` random numbers per token instead of ``V``.

The random numbers come from a counter-based hash (splitmix64's finalizer) of (seed, index, stage,
block or token id), computed with 64-bit integer tensor ops, so the same seed gives the same text on
every device and batch shape.
"""

from __future__ import annotations

import torch

BLOCK = 512
"""Token ids per block of the two-stage race (about sqrt of a 150k vocabulary, rounded to a power of 2)."""

_M64 = (1 << 64) - 1


def _signed(x: int) -> int:
    """An unsigned 64-bit value as the int64 with the same bits."""
    x &= _M64
    return x - (1 << 64) if x >= 1 << 63 else x


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_C1 = _signed(0xBF58476D1CE4E5B9)
_C2 = _signed(0x94D049BB133111EB)
_BLOCK_STAGE, _TOKEN_STAGE = 1, 2


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (torch's ``>>`` is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def mix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finalizer on int64 tensors (multiplication wraps modulo 2**64)."""
    x = (x ^ _shr(x, 30)) * _C1
    x = (x ^ _shr(x, 27)) * _C2
    return x ^ _shr(x, 31)


def mix64_reference(x: int) -> int:
    """The same function on Python integers, as unsigned 64-bit values (the tests' reference)."""
    x &= _M64
    x = ((x ^ (x >> 30)) * (_C1 & _M64)) & _M64
    x = ((x ^ (x >> 27)) * (_C2 & _M64)) & _M64
    return x ^ (x >> 31)


def _row_keys(seed: int, indices: torch.Tensor, stage: int) -> torch.Tensor:
    """One 64-bit key per (seed, token index, stage): ``[n, 1]``."""
    base = mix64(torch.tensor(_signed(seed + stage * 0x632BE59BD9B4E019), dtype=torch.long, device=indices.device))
    return mix64(base ^ (indices.long() * _GOLDEN))[:, None]


def exponentials(keys: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Float64 Exp(1) variates, one per (row key, id): ``keys [n, 1]``, ``ids [n, m]`` or ``[m]``."""
    bits = mix64(ids * _GOLDEN + keys)
    u = (_shr(bits, 11).double() + 0.5) * 2.0**-53  # 53 random bits, strictly inside (0, 1)
    return -torch.log(u)


def race(probs: torch.Tensor, seed: int, first_index: int) -> torch.Tensor:
    """The token each row of ``probs`` (``[n, V]``) samples, row ``r`` being the token at sequence index
    ``first_index + r``. Exactly distributed as ``probs``; a deterministic function of the seed, the
    index and the probabilities."""
    n, vocab = probs.shape
    dev = probs.device
    blocks = -(-vocab // BLOCK)
    padded = torch.nn.functional.pad(probs, (0, blocks * BLOCK - vocab)) if blocks * BLOCK != vocab else probs
    grouped = padded.view(n, blocks, BLOCK)
    indices = torch.arange(first_index, first_index + n, device=dev)
    mass = grouped.sum(-1, dtype=torch.float64)
    winner = (mass / exponentials(_row_keys(seed, indices, _BLOCK_STAGE), torch.arange(blocks, device=dev))).argmax(-1)
    inside = grouped[torch.arange(n, device=dev), winner].double()
    ids = winner[:, None] * BLOCK + torch.arange(BLOCK, device=dev)
    pick = (inside / exponentials(_row_keys(seed, indices, _TOKEN_STAGE), ids)).argmax(-1)
    return winner * BLOCK + pick
