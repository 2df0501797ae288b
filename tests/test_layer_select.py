"""CLaSp's dynamic program against brute force, and its invariants."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from clasp_decoding.layer_select import backtrack, clasp_dp, every_other_middle, final_state
from clasp_decoding.runner import ModelRunner
from conftest import ARCHS, random_prompt, scratch_cache, tiny_model


def additive_layers(num_layers: int, dim: int = 64, seed: int = 0):
    """Layers ``f_i(h) = h + delta_i`` with mutually orthogonal deltas, orthogonal to ``h_0``.

    Here the DP's assumption holds exactly: of two states with the same number of layers skipped, the
    one closer to ``h_i`` stays closer after any common later layers (similarity grows with the kept
    squared norm), so the DP must find the brute-force optimum: skip the smallest deltas."""
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(dim, num_layers + 1, generator=g, dtype=torch.float64))
    h0 = basis[:, 0] * 2.0
    scales = torch.rand(num_layers, generator=g, dtype=torch.float64) * 3 + 0.1
    deltas = [basis[:, i + 1] * scales[i] for i in range(num_layers)]

    def run_layer(i: int, states: torch.Tensor) -> torch.Tensor:
        return states + deltas[i - 1]

    hidden = [h0]
    for d in deltas:
        hidden.append(hidden[-1] + d)
    return torch.stack(hidden), run_layer, scales


def brute_force(hidden: torch.Tensor, num_skip: int, run_layer) -> tuple[tuple[int, ...], float]:
    num_layers = hidden.shape[0] - 1
    best, best_sim = None, -2.0
    for skip in itertools.combinations(range(num_layers), num_skip):
        sim = float(F.cosine_similarity(final_state(hidden[0], skip, num_layers, run_layer), hidden[-1], dim=0))
        if sim > best_sim + 1e-12:
            best, best_sim = skip, sim
    return best, best_sim


@pytest.mark.parametrize("seed", range(6))
def test_dp_finds_the_optimum_where_its_assumption_holds(seed):
    num_layers = 9
    hidden, run_layer, scales = additive_layers(num_layers, seed=seed)
    for m in range(1, num_layers):
        dp = clasp_dp(hidden, m, run_layer)
        best, _ = brute_force(hidden, m, run_layer)
        assert dp == best
        assert dp == tuple(sorted(torch.argsort(scales)[:m].tolist()))


@pytest.mark.parametrize("arch", ARCHS)
def test_dp_on_real_layers_skips_exactly_m_and_beats_most_sets(arch):
    """On a real (tiny) model the DP is approximate; it must still return exactly M valid layers, and
    its skip set must reach a final state closer to h_L than most skip sets of the same size."""
    model = tiny_model(arch, seed=7, layers=8)
    runner = ModelRunner(model)
    prompt = torch.tensor(random_prompt(7, 20))
    cache = scratch_cache(runner, 64)
    _, hidden = runner.forward(cache, prompt, 0, collect_hidden=True)
    cache.rollback(len(prompt))
    pos = len(prompt) - 1
    h = hidden[:, pos]
    run_layer = lambda i, s: runner.layer_candidates(cache, i - 1, s, pos)  # noqa: E731
    for m in range(0, runner.num_layers + 1):
        dp = clasp_dp(h, m, run_layer)
        assert len(dp) == m and len(set(dp)) == m and all(0 <= i < runner.num_layers for i in dp)
        assert list(dp) == sorted(dp)
        if 2 <= m <= 5:
            sims = sorted(
                float(F.cosine_similarity(final_state(h[0], s, runner.num_layers, run_layer), h[-1], dim=0))
                for s in itertools.combinations(range(runner.num_layers), m)
            )
            mine = float(F.cosine_similarity(final_state(h[0], dp, runner.num_layers, run_layer), h[-1], dim=0))
            assert mine >= sims[len(sims) // 2], (m, dp)


def test_dp_uses_one_layer_call_per_layer():
    """The sequence-parallel trick: all candidates of a layer go through one call."""
    num_layers = 10
    hidden, run_layer, _ = additive_layers(num_layers)
    calls = []

    def counting(i, states):
        calls.append((i, states.shape[0]))
        return run_layer(i, states)

    clasp_dp(hidden, 4, counting)
    assert len(calls) <= num_layers
    assert len({i for i, _ in calls}) == len(calls)
    assert max(n for _, n in calls) <= 4


def test_backtrack_reads_the_decisions():
    choice = torch.zeros(5, 3, dtype=torch.bool)
    choice[4, 2] = True  # layer 4 skipped from g[4][2]; then g[3][1] ran layer 3; g[2][1] skipped layer 2
    choice[2, 1] = True
    assert backtrack(choice, 4, 2) == (1, 3)
    assert backtrack(torch.zeros(4, 4, dtype=torch.bool), 3, 3) == (0, 1, 2)


def test_every_other_middle():
    assert every_other_middle(28, 8) == (6, 8, 10, 12, 14, 16, 18, 20)
    assert len(every_other_middle(24, 12)) == 12
    assert every_other_middle(6, 0) == ()
    for n in range(2, 30):
        for m in range(n):
            s = every_other_middle(n, m)
            assert len(set(s)) == m and all(0 <= i < n for i in s)
    with pytest.raises(ValueError):
        every_other_middle(4, 5)
    with pytest.raises(ValueError):
        clasp_dp(torch.zeros(4, 2), 4, lambda i, s: s)
