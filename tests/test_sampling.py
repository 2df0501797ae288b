"""Sampling is lossless: exact acceptance arithmetic, and a statistical test of the whole loop."""

from __future__ import annotations

import itertools

import pytest
import torch

from clasp_decoding import sampling
from clasp_decoding.api import runner_for
from clasp_decoding.config import GenerationConfig
from clasp_decoding.decoding import decode, start_session
from clasp_decoding.sampling import SamplingParams, greedy_accept, residual, speculative_accept, warp
from conftest import tiny_model

# ----------------------------------------------------------------------------- arithmetic


def test_greedy_accept_counts_the_agreeing_prefix():
    logits = torch.full((4, 10), -1.0)
    for row, tok in enumerate([5, 6, 9, 1]):
        logits[row, tok] = 1.0
    assert greedy_accept(torch.tensor([5, 6, 7]), logits) == (2, 9)
    assert greedy_accept(torch.tensor([5, 6, 9]), logits) == (3, 1)  # all agree: the bonus token
    assert greedy_accept(torch.tensor([4, 6, 9]), logits) == (0, 5)
    assert greedy_accept(torch.tensor([], dtype=torch.long), logits[:1]) == (0, 5)


def test_residual_is_the_normalized_positive_part():
    p = torch.tensor([0.2, 0.5, 0.3])
    q = torch.tensor([0.5, 0.3, 0.2])
    torch.testing.assert_close(residual(p, q), torch.tensor([0.0, 2 / 3, 1 / 3]))
    torch.testing.assert_close(residual(p, p.clone()), p)  # p == q: no mass left, fall back to p


def test_acceptance_probability_is_min_one_p_over_q():
    p = torch.tensor([[0.2, 0.5, 0.3], [0.1, 0.1, 0.8]])
    q = torch.tensor([[0.5, 0.3, 0.2]])
    g = torch.Generator().manual_seed(0)
    n = 20000
    accepted = sum(speculative_accept(torch.tensor([0]), q, p, g)[0] for _ in range(n))
    # P(accept token 0) = 0.2 / 0.5 = 0.4; 5 standard deviations of a binomial.
    assert abs(accepted / n - 0.4) < 5 * (0.4 * 0.6 / n) ** 0.5
    # p(x) >= q(x): always accepted. p(x) = 0: never, and the replacement is never x.
    assert all(speculative_accept(torch.tensor([1]), q, p, g)[0] == 1 for _ in range(200))
    p0 = torch.tensor([[0.0, 0.5, 0.5], [0.3, 0.3, 0.4]])
    for _ in range(200):
        a, tok = speculative_accept(torch.tensor([0]), q, p0, g)
        assert a == 0 and tok != 0


def test_deterministic_drafts_accept_with_probability_p():
    p = torch.tensor([[0.25, 0.75], [0.5, 0.5]])
    g = torch.Generator().manual_seed(1)
    n = 20000
    accepted = sum(speculative_accept(torch.tensor([0]), None, p, g)[0] for _ in range(n))
    assert abs(accepted / n - 0.25) < 5 * (0.25 * 0.75 / n) ** 0.5


def test_one_step_output_is_distributed_as_p():
    """Draft from q, accept/reject against p: the emitted token must follow p exactly."""
    p = torch.tensor([0.05, 0.4, 0.15, 0.3, 0.1])
    q = torch.tensor([0.3, 0.1, 0.3, 0.1, 0.2])
    g = torch.Generator().manual_seed(2)
    n = 20000
    counts = torch.zeros(5)
    for _ in range(n):
        d = sampling.sample(q[None], g)
        a, tok = speculative_accept(d, q[None], torch.stack([p, p]), g)
        counts[int(d[0]) if a == 1 else tok] += 1
    assert chi_square_pvalue(counts, p * n) > 1e-3


def test_warp_matches_transformers_processors():
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    torch.manual_seed(0)
    logits = torch.randn(3, 50) * 3
    for t, k, p in [(0.7, 0, 1.0), (1.0, 5, 1.0), (1.3, 0, 0.8), (0.5, 10, 0.6), (1.0, 1, 1.0)]:
        ref = TemperatureLogitsWarper(t)(None, logits.clone())
        if k:
            ref = TopKLogitsWarper(k)(None, ref)
        if p < 1:
            ref = TopPLogitsWarper(p)(None, ref)
        expected = torch.softmax(ref, -1)
        torch.testing.assert_close(warp(logits, SamplingParams(t, k, p)), expected, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- the whole loop


def chi_square_pvalue(observed: torch.Tensor, expected: torch.Tensor, min_expected: float = 5.0) -> float:
    """Pearson's chi-square test, pooling cells whose expected count is below ``min_expected``."""
    observed, expected = observed.double(), expected.double()
    small = expected < min_expected
    obs = torch.cat([observed[~small], observed[small].sum()[None]]) if small.any() else observed
    exp = torch.cat([expected[~small], expected[small].sum()[None]]) if small.any() else expected
    keep = exp > 0
    stat = float((((obs - exp) ** 2)[keep] / exp[keep]).sum())
    dof = int(keep.sum()) - 1
    return float(
        torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), torch.tensor(stat / 2, dtype=torch.float64))
    )


VOCAB, STEPS, PROMPT = 6, 3, [3, 1, 4, 1, 5]


@pytest.fixture(scope="module")
def small_vocab_model():
    """A model with six tokens and sharp enough distributions that drafts disagree with the target."""
    return tiny_model("llama", seed=8, vocab=VOCAB, layers=4)


def exact_distribution(model, params: SamplingParams) -> dict[tuple[int, ...], float]:
    """p(x1) p(x2|x1) p(x3|x1,x2) for every sequence, by enumeration with the model's own forward."""
    seqs = list(itertools.product(range(VOCAB), repeat=STEPS))
    inputs = torch.tensor([PROMPT + list(s) for s in seqs])
    with torch.inference_mode():
        logits = model(inputs).logits.float()
    n = len(PROMPT)
    probs = warp(logits[:, n - 1 : n - 1 + STEPS], params)
    out = {}
    for i, s in enumerate(seqs):
        out[s] = float(torch.prod(torch.stack([probs[i, j, s[j]] for j in range(STEPS)])))
    return out


def sample_many(model, cfg: GenerationConfig, n: int) -> torch.Tensor:
    runner = runner_for(model)
    counts = torch.zeros(VOCAB**STEPS)
    for seed in range(n):
        c = cfg.updated(seed=seed)
        session = start_session(runner, PROMPT, c, set())
        out = [t for chunk in decode(runner, PROMPT, c, set(), None, session) for t in chunk]
        idx = 0
        for t in out:
            idx = idx * VOCAB + t
        counts[idx] += 1
    return counts


LOSSLESS = [
    dict(
        method="clasp", temperature=1.0, num_skip=2, draft_exit_threshold=0.0, max_draft_tokens=3, layer_opt_interval=1
    ),
    dict(method="static", temperature=0.7, skip_layers=(1, 2), draft_exit_threshold=0.0, max_draft_tokens=3, top_k=4),
    dict(method="clasp", temperature=1.0, num_skip=1, draft_exit_threshold=0.4, max_draft_tokens=2, top_p=0.9),
    dict(method="pld", temperature=1.0, lookup_min_ngram=1, lookup_max_ngram=2),
]


@pytest.mark.slow
@pytest.mark.parametrize("setting", range(len(LOSSLESS)))
def test_speculative_sampling_keeps_the_model_distribution(small_vocab_model, setting):
    cfg = GenerationConfig(max_new_tokens=STEPS, **LOSSLESS[setting])
    exact = exact_distribution(small_vocab_model, cfg.sampling)
    n = 3000
    counts = sample_many(small_vocab_model, cfg, n)
    expected = torch.tensor([exact[s] for s in itertools.product(range(VOCAB), repeat=STEPS)]) * n
    assert abs(float(expected.sum()) - n) < 1e-3 * n
    assert chi_square_pvalue(counts, expected) > 1e-3


def accept_everything(draft, draft_probs, target_probs, generator):
    """Planted bug: skip the p/q test and keep every draft."""
    k = draft.shape[0]
    return k, int(sampling.sample(target_probs[k : k + 1], generator)[0])


def resample_from_p(draft, draft_probs, target_probs, generator):
    """Planted bug: after a rejection, sample from p instead of norm(max(p - q, 0))."""
    monkey = sampling.residual
    try:
        sampling.residual = lambda p, q: p
        return sampling.speculative_accept(draft, draft_probs, target_probs, generator)
    finally:
        sampling.residual = monkey


@pytest.mark.slow
@pytest.mark.parametrize("bug", [accept_everything, resample_from_p])
def test_the_statistical_test_catches_planted_bugs(small_vocab_model, monkeypatch, bug):
    """The same test, at the same strict level, must reject a loop whose acceptance is subtly wrong."""
    monkeypatch.setattr("clasp_decoding.decoding.speculative_accept", bug)
    cfg = GenerationConfig(
        max_new_tokens=STEPS,
        method="static",
        temperature=1.0,
        skip_layers=(0, 1, 2),
        draft_exit_threshold=0.0,
        max_draft_tokens=3,
    )
    exact = exact_distribution(small_vocab_model, cfg.sampling)
    n = 3000
    counts = sample_many(small_vocab_model, cfg, n)
    expected = torch.tensor([exact[s] for s in itertools.product(range(VOCAB), repeat=STEPS)]) * n
    assert chi_square_pvalue(counts, expected) < 1e-3
