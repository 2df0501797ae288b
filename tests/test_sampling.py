"""Sampling arithmetic: warping, acceptance rules, and the position-keyed sampler.

The acceptance rule of speculative sampling is checked against its exact law, computed here by
enumeration (an implementation independent of the one under test), on synthetic ``p`` and ``q`` with
1-4 drafts, including a one-hot ``q`` (prompt lookup) and a ``q`` that is zero outside a reduced
vocabulary. Planted bugs must fail the same check (sample sizes and measured rates: docs/sampling.md).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from clasp_decoding import noise, sampling
from clasp_decoding.sampling import SamplingParams, greedy_accept, prefix_accept, residual, speculative_accept, warp
from lossless_stats import chi_square_pvalue

ALPHA = 1e-4
"""Significance level of every statistical test: the correct code must pass, planted bugs must fail."""

# ----------------------------------------------------------------------------- arithmetic


def test_prefix_acceptance_counts_the_agreeing_prefix():
    logits = torch.full((4, 10), -1.0)
    for row, tok in enumerate([5, 6, 9, 1]):
        logits[row, tok] = 1.0
    assert greedy_accept(torch.tensor([5, 6, 7]), logits) == (2, 9)
    assert greedy_accept(torch.tensor([5, 6, 9]), logits) == (3, 1)  # all agree: the bonus token
    assert greedy_accept(torch.tensor([4, 6, 9]), logits) == (0, 5)
    assert greedy_accept(torch.tensor([], dtype=torch.long), logits[:1]) == (0, 5)
    assert prefix_accept(torch.tensor([5, 0, 9]), torch.tensor([5, 6, 9, 1])) == (1, 6)  # a prefix, not a count


def test_residual_is_the_normalized_positive_part():
    p = torch.tensor([0.2, 0.5, 0.3])
    q = torch.tensor([0.5, 0.3, 0.2])
    torch.testing.assert_close(residual(p, q), torch.tensor([0.0, 2 / 3, 1 / 3]))
    torch.testing.assert_close(residual(p, p.clone()), p)  # p == q: no mass left, fall back to p


def test_warp_matches_transformers_processors():
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    torch.manual_seed(0)
    logits = torch.randn(3, 50) * 3
    for t, k, p in [(0.7, 0, 1.0), (1.0, 5, 1.0), (1.3, 0, 0.8), (0.5, 10, 0.6), (1.0, 1, 1.0)]:
        ref = TemperatureLogitsWarper(t)(None, logits.clone())
        if k:
            ref = TopKLogitsWarper(k)(None, ref)
        if p < 1:
            ref = TopPLogitsWarper(p)(None, ref)
        torch.testing.assert_close(warp(logits, SamplingParams(t, k, p)), torch.softmax(ref, -1), rtol=1e-5, atol=1e-6)


def test_tiny_temperatures_mean_greedy():
    assert SamplingParams(1e-300).greedy and SamplingParams(0.0).greedy and not SamplingParams(1e-4).greedy


# ----------------------------------------------------------------------------- speculative acceptance, exactly


def exact_round_law(p: torch.Tensor, q: torch.Tensor, draft: list[int] | None = None) -> torch.Tensor:
    """The exact law of ``(accepted count a, next token t)`` of one speculative-sampling round, by
    enumerating every draft: ``[k + 1, V]``. ``q`` rows are the draft's distributions; with ``draft``
    given, the draft is that fixed sequence (``q`` one-hot, as prompt lookup makes it)."""
    p, q = p.double(), q.double()
    k, vocab = q.shape
    law = torch.zeros(k + 1, vocab, dtype=torch.float64)
    drafts = [tuple(draft)] if draft is not None else itertools.product(range(vocab), repeat=k)
    for x in drafts:
        weight = 1.0 if draft is not None else float(torch.prod(q[torch.arange(k), torch.tensor(x)]))
        if weight == 0:
            continue
        reach = weight
        for j in range(k):
            qj = q[j] if draft is None else torch.nn.functional.one_hot(torch.tensor(x[j]), vocab).double()
            r = min(1.0, float(p[j, x[j]] / qj[x[j]]))
            rest = (p[j] - qj).clamp_min(0)
            law[j] += reach * (1 - r) * (rest / rest.sum() if rest.sum() > 0 else p[j])
            reach *= r
        law[k] += reach * p[k]
    return law


def run_rounds(accept, p, q, n, seed, draft=None):
    """``n`` rounds through ``accept``: counts of ``(a, t)`` and of the completed sequence (the round's
    tokens, then plain samples from ``p`` for the positions the round did not reach)."""
    g = torch.Generator().manual_seed(seed)
    k, vocab = q.shape
    pairs = torch.zeros(k + 1, vocab)
    seqs = torch.zeros(vocab ** (k + 1))
    fill = torch.multinomial(p, n, replacement=True, generator=g).T  # [n, k + 1] plain samples per position
    for i in range(n):
        if draft is None:
            d = torch.multinomial(q, 1, generator=g).view(-1)
            a, t = accept(d, q, p, g)
        else:
            d = torch.tensor(draft)
            a, t = accept(d, None, p, g)
        pairs[a, t] += 1
        seq = [*d[:a].tolist(), t, *fill[i, a + 1 :].tolist()]
        seqs[sum(tok * vocab**j for j, tok in enumerate(reversed(seq)))] += 1
    return pairs, seqs


def product_law(p: torch.Tensor) -> torch.Tensor:
    """The law of independent tokens ``x_i ~ p_i`` over all sequences (first token most significant)."""
    law = p[0].double()
    for row in p[1:]:
        law = (law[:, None] * row.double()[None, :]).flatten()
    return law


def synthetic(k: int, vocab: int, kind: str, seed: int) -> tuple[torch.Tensor, torch.Tensor, list[int] | None]:
    """Target rows ``p`` ``[k + 1, V]`` and draft rows ``q`` ``[k, V]`` that differ from each other (so
    that a wrong row index shows), and a fixed draft for one-hot ``q``."""
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(2.0 * torch.randn(k + 1, vocab, generator=g, dtype=torch.float64), -1)
    q = torch.softmax(2.0 * torch.randn(k, vocab, generator=g, dtype=torch.float64), -1)
    draft = None
    if kind == "close":  # a good draft: most rounds accept everything, so the bonus row matters
        q = 0.85 * p[:k] + 0.15 * q
    if kind == "reduced":  # a draft head over the first three ids only
        q[:, 3:] = 0
        q = q / q.sum(-1, keepdim=True)
    if kind == "onehot":
        draft = [int(p[i].argmax()) if i % 2 == 0 else int(p[i].argmin()) for i in range(k)]
        q = torch.nn.functional.one_hot(torch.tensor(draft), vocab).double()
    return p, q, draft


CASES = [
    (1, 5, "generic"),
    (2, 5, "generic"),
    (3, 4, "generic"),
    (4, 4, "generic"),
    (3, 4, "close"),
    (2, 5, "onehot"),
    (4, 4, "onehot"),
    (3, 5, "reduced"),
]
N_ROUNDS = 6000


def acceptance_pvalues(accept, k, vocab, kind, n=N_ROUNDS, seed=0) -> tuple[float, float]:
    p, q, draft = synthetic(k, vocab, kind, seed=10 + k)
    pairs, seqs = run_rounds(accept, p, q, n, seed, draft)
    law = exact_round_law(p, q, draft)
    assert abs(float(law.sum()) - 1) < 1e-9
    return chi_square_pvalue(pairs, law * n), chi_square_pvalue(seqs, product_law(p) * n)


@pytest.mark.parametrize("k, vocab, kind", CASES)
def test_speculative_acceptance_has_its_exact_law(k, vocab, kind):
    """The (accepted count, next token) law equals the exact one, and the round's tokens completed by
    plain samples are distributed as independent draws from the target rows."""
    pairs, seqs = acceptance_pvalues(speculative_accept, k, vocab, kind)
    assert pairs > ALPHA and seqs > ALPHA, (pairs, seqs)


def _mutant(kind: str):
    """``speculative_accept`` with one planted bug."""

    def accept(draft, draft_probs, target_probs, generator):
        k = draft.shape[0]
        idx = torch.arange(k)
        q = (
            torch.nn.functional.one_hot(draft, target_probs.shape[-1]).to(target_probs.dtype)
            if draft_probs is None
            else draft_probs
        )
        p_x, q_x = target_probs[idx, draft], q[idx, draft]
        u = torch.rand(k, generator=generator)
        ok = (u * p_x < q_x) if kind == "inverted_ratio" else (u * q_x < p_x)
        a = int(ok.long().sum()) if kind == "no_cumprod" else int(ok.long().cumprod(0).sum())
        if a == k:
            row = 0 if kind == "wrong_bonus_row" else k
            return k, int(sampling.sample(target_probs[row : row + 1], generator)[0])
        fix = residual(target_probs[a], q[0] if kind == "wrong_residual_row" else q[a])
        return a, int(sampling.sample(fix[None], generator)[0])

    return accept


MUTANTS = ["no_cumprod", "wrong_residual_row", "wrong_bonus_row", "inverted_ratio"]


@pytest.mark.parametrize("bug", MUTANTS)
def test_planted_acceptance_bugs_fail_the_exact_test(bug):
    """Each planted bug is caught (either statistic below the level) on one of the cases that show it."""
    cases = ((3, 4, "generic"), (4, 4, "onehot"), (3, 4, "close"))
    assert any(min(acceptance_pvalues(_mutant(bug), k, v, kind, n=4000)) < ALPHA for k, v, kind in cases), bug


def test_the_mutants_differ_only_by_their_bug():
    """Guard against a broken harness: the unmutated copy passes exactly like the real function."""

    def clean(draft, draft_probs, target_probs, generator):
        return _mutant("none")(draft, draft_probs, target_probs, generator)

    assert min(acceptance_pvalues(clean, 3, 4, "generic")) > ALPHA


# ----------------------------------------------------------------------------- the position-keyed sampler


def test_hash_matches_its_python_reference():
    g = torch.Generator().manual_seed(0)
    values = torch.randint(-(2**62), 2**62, (200,), generator=g) * 2 + torch.randint(0, 2, (200,), generator=g)
    values = torch.cat([values, torch.tensor([0, 1, -1, 2**63 - 1, -(2**63)])])
    got = noise.mix64(values.clone()).tolist()
    want = [noise._signed(noise.mix64_reference(int(v))) for v in values.tolist()]
    assert got == want


def test_race_depends_on_seed_and_index_only():
    probs = torch.softmax(torch.randn(6, 1300), -1)
    together = noise.race(probs, seed=123, first_index=40)
    alone = torch.cat([noise.race(probs[i : i + 1], seed=123, first_index=40 + i) for i in range(6)])
    assert torch.equal(together, alone)  # no dependence on batch shape
    assert torch.equal(noise.race(probs, 123, 40), together)  # nor on call order
    assert not torch.equal(noise.race(probs, 124, 40), together) or not torch.equal(
        noise.race(probs, 123, 41), together
    )


WARPS = [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.0, 5, 1.0), (1.3, 0, 0.8), (0.8, 12, 0.9)]


@pytest.mark.parametrize("vocab", [40, 600])
@pytest.mark.parametrize("t, k, top_p", WARPS)
def test_keyed_sampling_draws_exactly_from_the_warped_distribution(vocab, t, k, top_p):
    """Over many token indices, the race's winners follow the warped distribution (one block of the
    two-stage race, and two blocks with a partial last one)."""
    g = torch.Generator().manual_seed(vocab + k)
    logits = 3.0 * torch.randn(vocab, generator=g)
    probs = warp(logits[None], SamplingParams(t, k, top_p))[0]
    n = 20000
    winners = noise.race(probs.expand(n, vocab), seed=2024, first_index=0)
    counts = torch.bincount(winners, minlength=vocab).double()
    assert chi_square_pvalue(counts, probs.double() * n) > ALPHA
    assert counts[probs == 0].sum() == 0  # filtered tokens are never drawn


def test_keyed_verification_accepts_exactly_the_target_tokens():
    sampler = sampling.Sampler(SamplingParams(1.0), mode="keyed", seed=9)
    logits = torch.randn(5, 30)
    target = sampler.choose(logits, 100)
    assert sampler.accept(target[:4], None, logits, 100) == (4, int(target[4]))
    wrong = target[:4].clone()
    wrong[2] = (wrong[2] + 1) % 30
    assert sampler.accept(wrong, None, logits, 100) == (2, int(target[2]))
