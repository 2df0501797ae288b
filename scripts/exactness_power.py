#!/usr/bin/env python3
"""How often the exactness tests catch plausible bugs, planted one at a time (docs/sampling.md).

Each planted bug is a small change a real mistake could make; each is run against the tests meant to
catch it (with other seeds and models each repeat) and against the older tests it slipped past, so the
table shows what the new tests add:

- ``block-keys``: the token race draws with the block race's keys (id 0 then shares its noise with
  block 0): the multi-block race test, and the older one-block/two-block race test;
- ``eos-row0``: end-of-sequence held back on row 0 of each call only: the every-position
  ``min_new_tokens`` test, and the older one;
- ``verify-index``: each verification's rows keyed one index early (a bug every method shares, plain
  decoding too): the independent reference loop, and the older seeded method-vs-``ar`` test;
- ``prefill-index``: the prefill's token keyed one index early (shared by every method): the same two;
- ``uniform-53``: the old 53-bit uniform (its largest value rounds to 1.0, a zero exponential): the
  crafted-seed tests (the largest-uniform test catches it; the zero-probability test alone does not,
  since zero-probability ids also score below every other, a second guard);
- ``stop-round``: stop strings searched from the text's length before the round: the grouping test.

Usage: python scripts/exactness_power.py [--repeats 10] [--only block-keys,eos-row0]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from clasp_decoding import decoding, noise, sampling, text  # noqa: E402

ALPHA = 1e-4


# ----------------------------------------------------------------------------- the planted bugs


@contextlib.contextmanager
def planted(name: str):
    saved = []

    def patch(owner, attr, value):
        saved.append((owner, attr, getattr(owner, attr)))
        setattr(owner, attr, value)

    if name == "block-keys":
        keys = noise._row_keys
        patch(noise, "_row_keys", lambda seed, first, n, stage, dev: keys(seed, first, n, noise._BLOCK_STAGE, dev))
    elif name == "eos-row0":
        suppress = sampling.Sampler._suppress

        def row0(self, logits, index, vocab=None):
            out = suppress(self, logits, index, vocab)
            if out is not logits and logits.shape[0] > 1:
                out = torch.cat([out[:1], logits[1:]])
            return out

        patch(sampling.Sampler, "_suppress", row0)
    elif name == "verify-index":
        accept = sampling.Sampler.accept
        patch(
            sampling.Sampler,
            "accept",
            lambda self, draft, probs, logits, index: accept(self, draft, probs, logits, index - 1),
        )
    elif name == "prefill-index":
        prefill = decoding.Generation._prefill

        def early(self):
            choose = self.state.sampler.choose
            self.state.sampler.choose = lambda logits, index: choose(logits, index - 1)
            try:
                return prefill(self)
            finally:
                del self.state.sampler.choose

        patch(decoding.Generation, "_prefill", early)
    elif name == "uniform-53":
        patch(noise, "uniforms", lambda bits: (noise._shr(bits, 11).double() + 0.5) * 2.0**-53)
    elif name == "stop-round":
        add = text.IncrementalDecoder.add

        def from_round_start(self, new_ids):
            self.final = len(self.text)  # the old rule: search from the text before this round
            result = add(self, new_ids)
            return result

        patch(text.IncrementalDecoder, "add", from_round_start)
    elif name != "none":
        raise ValueError(name)
    try:
        yield
    finally:
        for owner, attr, value in reversed(saved):
            setattr(owner, attr, value)


# ----------------------------------------------------------------------------- the tests, by seed


def caught(check) -> bool:
    """Whether ``check`` fails (an assertion or a statistical rejection)."""
    try:
        return bool(check())
    except AssertionError:
        return True


def passes(test, cases) -> bool:
    """Run an asserting test on every case; False when all pass (the failure is the AssertionError)."""
    for case in cases:
        test(case)
    return False


def new_tests(seed: int) -> dict:
    import test_exactness as t
    from reference import byte_fallback_tokenizer

    tok = byte_fallback_tokenizer(extra_words=1300 - 280)
    return {
        "block-keys": lambda: t.race_pvalue(seed=seed) < ALPHA,
        "eos-row0": lambda: t.check_min_new_tokens(dict(temperature=1.0, seed=seed), model_seed=6 + seed % 5),
        "verify-index": lambda: t.check_against_reference(
            "qwen2", dict(temperature=0.9, top_k=60, seed=seed), tok, model_seed=seed
        ),
        "prefill-index": lambda: t.check_against_reference(
            "llama", dict(temperature=1.0, seed=seed), tok, model_seed=seed
        ),
        "uniform-53": lambda: (
            passes(t.test_no_seed_picks_a_zero_probability_id, (0, seed, 2**40))
            or passes(lambda _: t.test_the_hash_inverts_and_reaches_the_largest_uniform(), [None])
        ),
        "stop-round": lambda: passes(t.test_stop_strings_do_not_depend_on_rounds, t.STOP_CASES),
    }


def old_tests() -> dict:
    """The tests that were there before (fixed seeds: one deterministic verdict each)."""
    import test_losslessness as tl
    import test_sampling as ts

    def old_race():
        ts.test_keyed_sampling_draws_exactly_from_the_warped_distribution(600, 1.0, 0, 1.0)

    return {
        "block-keys": old_race,
        "eos-row0": tl.test_min_new_tokens_holds_back_end_of_sequence,
        "verify-index": lambda: tl.test_seeded_sampling_equals_seeded_plain_decoding("qwen2", 0.8, 0, 1.0),
        "prefill-index": lambda: tl.test_seeded_sampling_equals_seeded_plain_decoding("llama", 0.8, 0, 1.0),
    }


BUGS = ("block-keys", "eos-row0", "verify-index", "prefill-index", "uniform-53", "stop-round")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--only", default=",".join(BUGS))
    a = ap.parse_args()
    torch.set_num_threads(2)
    print("| planted bug | new test: caught | new test, no bug: false alarms | older test: caught |")
    print("| --- | --- | --- | --- |")
    for bug in a.only.split(","):
        t0 = time.time()
        hits = alarms = 0
        for r in range(a.repeats):
            seed = 1000 + r
            with planted("none"):
                alarms += caught(new_tests(seed)[bug])
            with planted(bug):
                hits += caught(new_tests(seed)[bug])
        old = old_tests().get(bug)
        old_cell = "n/a (no test)"
        if old is not None:
            with planted(bug):
                old_cell = "yes" if caught(old) else "no"
        print(f"| `{bug}` | {hits}/{a.repeats} | {alarms}/{a.repeats} | {old_cell} |  ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
