"""Statistics shared by the losslessness tests and scripts/losslessness_power.py.

Two tests, both Pearson chi-square with small expected counts pooled:

- :func:`chi_square_pvalue`: observed counts against an exact expected law (the acceptance tests);
- :func:`conditional_pvalue`: sampled sequences against the model's exact conditionals. For every sampled
  token, the expected count of each vocabulary entry grows by its exact probability given the sample's
  own prefix; cells are (position, previous token). Correct sampling draws each token from exactly that
  conditional, so the statistic is (conservatively) chi-square with the counted degrees of freedom. A
  few degrees of freedom per position make it far more powerful than a test over whole sequences.
"""

from __future__ import annotations

import torch


def _pvalue(stat: float, dof: int) -> float:
    if dof <= 0:
        return 1.0
    return float(
        torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), torch.tensor(stat / 2, dtype=torch.float64))
    )


def _pooled(observed: torch.Tensor, expected: torch.Tensor, min_expected: float) -> tuple[float, int]:
    """Chi-square statistic and degrees of freedom of one multinomial cell, small categories pooled."""
    observed, expected = observed.double(), expected.double()
    small = expected < min_expected
    obs = torch.cat([observed[~small], observed[small].sum()[None]]) if small.any() else observed
    exp = torch.cat([expected[~small], expected[small].sum()[None]]) if small.any() else expected
    keep = exp > 0
    if bool((observed[expected <= 0] > 0).any()):
        return float("inf"), max(1, int(keep.sum()) - 1)  # an impossible outcome happened
    return float((((obs - exp) ** 2)[keep] / exp[keep]).sum()), int(keep.sum()) - 1


def chi_square_pvalue(observed: torch.Tensor, expected: torch.Tensor, min_expected: float = 5.0) -> float:
    """Pearson's chi-square test of ``observed`` counts against ``expected`` counts (same total)."""
    stat, dof = _pooled(observed.flatten(), expected.flatten(), min_expected)
    return 0.0 if stat == float("inf") else _pvalue(stat, dof)


def conditional_pvalue(
    samples: torch.Tensor, probs: torch.Tensor, prev: torch.Tensor, min_expected: float = 5.0
) -> float:
    """``samples`` ``[n, T]`` tokens; ``probs`` ``[n, T, V]`` each token's exact conditional law;
    ``prev`` ``[n, T]`` the token before each one. Two cell structures, (position, previous token) and
    position alone (fewer degrees of freedom: more power against errors common to all prefixes); the
    p-value is the smaller, Bonferroni-corrected."""
    by_prev = _conditional(samples, probs, prev, min_expected)
    by_position = _conditional(samples, probs, torch.zeros_like(prev), min_expected)
    return min(1.0, 2 * min(by_prev, by_position))


def _conditional(samples: torch.Tensor, probs: torch.Tensor, prev: torch.Tensor, min_expected: float) -> float:
    n, steps, vocab = probs.shape
    stat, dof = 0.0, 0
    for t in range(steps):
        for c in prev[:, t].unique():
            rows = prev[:, t] == c
            observed = torch.bincount(samples[rows, t], minlength=vocab).double()
            expected = probs[rows, t].double().sum(0)
            if expected.sum() < min_expected:
                continue
            s, d = _pooled(observed, expected, min_expected)
            if s == float("inf"):
                return 0.0
            stat, dof = stat + s, dof + d
    return _pvalue(stat, dof)
