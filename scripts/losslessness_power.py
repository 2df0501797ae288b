#!/usr/bin/env python
"""Measured false-alarm and detection rates of the losslessness tests: the same statistics as
tests/test_sampling.py and tests/test_losslessness.py, re-run with other random seeds.

- exact acceptance test: every case with the correct ``speculative_accept`` (false alarms) and each planted
  bug on the cases that can show it (detections), ``--repeats`` seeds each;
- end-to-end test: the correct loop and each planted bug on the poor-draft setting, fewer repeats (each
  run is hundreds of generations).

Usage: python scripts/losslessness_power.py [--repeats 20] [--e2e-repeats 5]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

import test_losslessness as E2E  # noqa: E402
import test_sampling as EXACT  # noqa: E402
from clasp_decoding import sampling  # noqa: E402
from clasp_decoding.config import GenerationConfig  # noqa: E402
from clasp_decoding.sampling import speculative_accept  # noqa: E402
from conftest import tiny_model  # noqa: E402

MUTANT_CASES = ((3, 4, "generic"), (4, 4, "onehot"), (3, 4, "close"))


def exact_rates(repeats: int) -> None:
    print(f"## Exact acceptance test ({EXACT.N_ROUNDS} rounds per case, mutants 4000, alpha {EXACT.ALPHA})\n")
    alarms = 0
    for seed in range(1, repeats + 1):
        alarms += any(
            min(EXACT.acceptance_pvalues(speculative_accept, *c, seed=seed)) < EXACT.ALPHA for c in EXACT.CASES
        )
    print(f"- correct code, all {len(EXACT.CASES)} cases: false alarms in {alarms}/{repeats} runs")
    for bug in EXACT.MUTANTS:
        found = sum(
            any(
                min(EXACT.acceptance_pvalues(EXACT._mutant(bug), *c, n=4000, seed=seed)) < EXACT.ALPHA
                for c in MUTANT_CASES
            )
            for seed in range(1, repeats + 1)
        )
        print(f"- {bug}: detected in {found}/{repeats} runs")


def e2e_rates(repeats: int) -> None:
    from dataclasses import replace

    from clasp_decoding.context import runner_for

    print(f"\n## End-to-end test ({E2E.N_SAMPLES} generations of {E2E.STEPS} tokens, alpha {EXACT.ALPHA})\n")
    model = tiny_model("llama", seed=8, vocab=E2E.VOCAB, layers=4)
    runner = runner_for(model)
    runner.numerics = replace(runner.numerics, attention_rowwise=False)
    original = sampling.speculative_accept
    for bug in (None, *EXACT.MUTANTS):
        sampling.speculative_accept = original if bug is None else EXACT._mutant(bug)
        rejected = 0
        settings = E2E.SETTINGS["clasp"] if bug is None else E2E.POOR_DRAFT
        cfg = GenerationConfig(max_new_tokens=E2E.STEPS, **settings)
        for rep in range(repeats):
            samples, *_ = E2E.sample(model, cfg, E2E.N_SAMPLES, "speculative", first_seed=(rep + 1) * 100_000)
            rejected += E2E.pvalue(model, cfg, samples) < EXACT.ALPHA
        what = "correct code (clasp setting): false alarms" if bug is None else f"{bug} (poor-draft setting): detected"
        print(f"- {what} in {rejected}/{repeats} runs", flush=True)
    sampling.speculative_accept = original


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--e2e-repeats", type=int, default=5)
    a = ap.parse_args()
    exact_rates(a.repeats)
    e2e_rates(a.e2e_repeats)


if __name__ == "__main__":
    main()
