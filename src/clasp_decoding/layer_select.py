"""Choosing which layers the draft skips: CLaSp's dynamic program and the fixed baselines.

Notation follows the paper. Layers are ``f_1 .. f_L`` (code index ``i - 1``), ``h_0`` is the embedding of
the last accepted token and ``h_i = f_i(h_{i-1})`` are the full model's hidden states of that token.
``g[i][j]`` is the best state reachable after the first ``i`` layers with exactly ``j`` of them skipped:
``g[i][0] = h_i``, ``g[i][i] = h_0``, and for ``0 < j < i`` the better (by cosine similarity to ``h_i``) of
skipping layer ``i`` (``g[i-1][j-1]``) and running it (``f_i(g[i-1][j])``). Backtracking from ``g[L][M]``
gives the skip set. For a given ``i`` all candidates ``f_i(g[i-1][j])`` are computed in one call
(``run_layer``), the sequence-parallel trick, so the DP costs ``L`` layer calls, not ``L * M``.

Only cells that can still reach ``g[L][M]`` are computed (``j >= M - (L - i)``). Decisions stay on the
device until the end: one host transfer per DP run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

RunLayer = Callable[[int, torch.Tensor], torch.Tensor]
"""``run_layer(i, states[n, d]) -> states[n, d]``: apply layer ``f_i`` (1-based) to ``n`` candidates."""


def clasp_dp(hidden: torch.Tensor, num_skip: int, run_layer: RunLayer) -> tuple[int, ...]:
    """CLaSp's approximate DP. ``hidden`` is ``[L + 1, d]`` (``h_0 .. h_L``); returns the sorted 0-based
    indices of the ``num_skip`` layers to skip."""
    num_layers = hidden.shape[0] - 1
    m = num_skip
    if not 0 <= m <= num_layers:
        raise ValueError(f"cannot skip {m} of {num_layers} layers")
    if m == 0:
        return ()
    if m == num_layers:
        return tuple(range(num_layers))
    h = hidden.float()
    g = h[0].expand(m + 1, -1).clone()  # row j = g[i][j]; row 0 starts as h_0 = g[0][0]
    skip_choice = torch.zeros(num_layers + 1, m + 1, dtype=torch.bool, device=hidden.device)
    for i in range(1, num_layers + 1):
        lo = max(0, m - (num_layers - i))  # cells that can still reach g[L][M]
        hi = min(i, m)
        new = g.clone()
        run_lo, run_hi = max(1, lo), min(i - 1, m)  # 0 < j < i: both options exist
        if run_lo <= run_hi:
            ran = run_layer(i, g[run_lo : run_hi + 1].to(hidden.dtype)).float()
            skipped = g[run_lo - 1 : run_hi]
            target = h[i].expand_as(ran)
            take_skip = F.cosine_similarity(skipped, target, dim=-1) > F.cosine_similarity(ran, target, dim=-1)
            new[run_lo : run_hi + 1] = torch.where(take_skip[:, None], skipped, ran)
            skip_choice[i, run_lo : run_hi + 1] = take_skip
        if lo == 0:
            new[0] = h[i]
        if hi == i:  # all of the first i layers skipped
            new[i] = h[0]
            skip_choice[i, i] = True
        g = new
    return backtrack(skip_choice, num_layers, m)


def backtrack(skip_choice, num_layers: int, num_skip: int) -> tuple[int, ...]:
    """Read the skip set off the DP's decisions (a ``[L + 1, M + 1]`` tensor, or nested lists), walking
    back from ``g[L][M]``."""
    rows = skip_choice.tolist() if isinstance(skip_choice, torch.Tensor) else skip_choice  # one transfer
    skipped = []
    j = num_skip
    for i in range(num_layers, 0, -1):
        if j == 0:
            break
        if j == i or rows[i][j]:
            skipped.append(i - 1)
            j -= 1
    return tuple(sorted(skipped))


def every_other_middle(num_layers: int, num_skip: int) -> tuple[int, ...]:
    """A fixed baseline: skip every other layer, centred on the middle of the stack."""
    if not 0 <= num_skip <= num_layers:
        raise ValueError(f"cannot skip {num_skip} of {num_layers} layers")
    if num_skip == 0:
        return ()
    span = 2 * num_skip - 1
    if span > num_layers - 2:  # not enough room for gaps: take a centred contiguous block instead
        start = (num_layers - num_skip) // 2
        return tuple(range(start, start + num_skip))
    start = (num_layers - span) // 2
    return tuple(range(start, start + span, 2))


def final_state(hidden0: torch.Tensor, skip: Sequence[int], num_layers: int, run_layer: RunLayer) -> torch.Tensor:
    """The state reached from ``h_0`` running every layer not in ``skip`` (for brute-force checks)."""
    state = hidden0[None]
    skipped = set(skip)
    for i in range(1, num_layers + 1):
        if i - 1 not in skipped:
            state = run_layer(i, state)
    return state[0]
