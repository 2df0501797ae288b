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
block or token id), computed with 64-bit integer tensor ops: the same seed and index give the same noise
on every device and batch shape. (The same *text* follows wherever the logits are the same bits: across
runs, batch shapes and drafting on one machine; another machine's kernels may round logits differently.)

No seed can make an impossible token win: each uniform has 52 random bits and lies strictly inside
(0, 1), so every exponential is finite and positive, and an id with zero probability (a padding id past
the vocabulary, a token removed by top-k or top-p, an end-of-sequence held back) scores -1, below every
id with positive probability, whatever its noise. Its one chance would be a row whose probabilities are
all zero, which warping never produces.
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


_STAGE_STEP = 0x632BE59BD9B4E019


def stage_key(seed: int, stage: int) -> int:
    """The hash of (seed, stage) as a signed 64-bit Python integer: made on the host, no device work."""
    return _signed(mix64_reference(seed + stage * _STAGE_STEP))


def _row_keys(seed: int, first_index: int, n: int, stage: int, device) -> torch.Tensor:
    """One 64-bit key per (seed, token index, stage) for indices ``first_index ..``: ``[n, 1]``. Built from
    Python integers (an ``arange`` and scalar operands): no tensor made from a list, no host sync."""
    indices = torch.arange(first_index, first_index + n, device=device, dtype=torch.long)
    return mix64(indices * _GOLDEN ^ stage_key(seed, stage))[:, None]


UNIFORM_BITS = 52


def uniforms(bits: torch.Tensor) -> torch.Tensor:
    """Float64 uniforms strictly inside (0, 1) from hashed bits: the top 52 bits plus one half, times
    2**-52 (the largest is ``1 - 2**-53``, exactly representable: never 1, so never a zero exponential)."""
    return (_shr(bits, 64 - UNIFORM_BITS).double() + 0.5) * 2.0**-UNIFORM_BITS


def exponentials(keys: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Float64 Exp(1) variates, one per (row key, id): ``keys [n, 1]``, ``ids [n, m]`` or ``[m]``; each
    finite and positive."""
    return -torch.log(uniforms(mix64(ids * _GOLDEN + keys)))


def _scores(weights: torch.Tensor, exps: torch.Tensor) -> torch.Tensor:
    """The race's scores ``w / E``, with every zero weight at -1: below any positive weight's score."""
    return torch.where(weights > 0, weights / exps, -1.0)


def race(probs: torch.Tensor, seed: int, first_index: int) -> torch.Tensor:
    """The token each row of ``probs`` (``[n, V]``) samples, row ``r`` being the token at sequence index
    ``first_index + r``. Exactly distributed as ``probs``; a deterministic function of the seed, the
    index and the probabilities."""
    n, vocab = probs.shape
    dev = probs.device
    blocks = -(-vocab // BLOCK)
    padded = torch.nn.functional.pad(probs, (0, blocks * BLOCK - vocab)) if blocks * BLOCK != vocab else probs
    grouped = padded.view(n, blocks, BLOCK)
    mass = grouped.sum(-1, dtype=torch.float64)
    block_keys = _row_keys(seed, first_index, n, _BLOCK_STAGE, dev)
    winner = _scores(mass, exponentials(block_keys, torch.arange(blocks, device=dev))).argmax(-1)
    inside = grouped[torch.arange(n, device=dev), winner].double()
    ids = winner[:, None] * BLOCK + torch.arange(BLOCK, device=dev)
    token_keys = _row_keys(seed, first_index, n, _TOKEN_STAGE, dev)
    pick = _scores(inside, exponentials(token_keys, ids)).argmax(-1)
    return winner * BLOCK + pick
