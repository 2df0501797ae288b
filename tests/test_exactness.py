"""Exact in every corner: seeds, stop strings, end-of-sequence holds, against independent references.

- No seed makes an impossible token win: a seed crafted (by inverting the hash) to give a zero-probability
  id the largest possible uniform still cannot pick it, in the token race or the block race.
- Stop decisions are a function of the token sequence alone: every grouping of tokens into rounds gives
  the same stop, the same text and the same pieces, and the stop falls where ``transformers``'
  ``stop_strings`` puts it, with a byte-fallback tokenizer whose text shrinks as characters complete.
- Every method's output equals an independent reference loop (plain ``transformers`` forward passes over
  a full cache, choosing each token itself) on vocabularies of several race blocks, with end-of-sequence
  ids, ``min_new_tokens``, stop strings and drafts of up to 8 tokens, greedy and seeded.
- The race is exact on multi-block vocabularies with mass in several blocks; ``min_new_tokens`` holds at
  every held-back position of long drafts, in the target and in drafts through a reduced or quantized head.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from clasp_decoding import noise
from clasp_decoding.config import GenerationConfig
from clasp_decoding.sampling import Sampler, SamplingParams, warp
from clasp_decoding.text import IncrementalDecoder
from conftest import random_prompt, run_tokens, tiny_model
from lossless_stats import chi_square_pvalue
from reference import BLOCK_STAGE, TOKEN_STAGE, byte_fallback_tokenizer, craft_seed, hashed_bits, reference_generate
from test_sampling import ALPHA

# ----------------------------------------------------------------------------- crafted seeds


def test_the_hash_inverts_and_reaches_the_largest_uniform():
    """The crafting helper gives any chosen bits; with all bits set the uniform is the largest one below
    1 and its exponential is positive (once, 53 bits made it exactly 1.0 and the exponential 0)."""
    for index, stage, ident in [(0, TOKEN_STAGE, 0), (12345, BLOCK_STAGE, 2), (7, TOKEN_STAGE, 100)]:
        seed = craft_seed(index, stage, ident)
        keys = noise._row_keys(seed, index, 1, stage, "cpu")
        bits = noise.mix64(torch.tensor([ident]) * noise._GOLDEN + keys)
        assert (int(bits) & ((1 << 64) - 1)) == hashed_bits(seed, index, stage, ident) == (1 << 64) - 1
        e = float(noise.exponentials(keys, torch.tensor([ident]))[0, 0])
        assert 0 < e < 1e-15


def _spread(vocab: int, seed: int, zero: list[int]) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(vocab, generator=g, dtype=torch.float64) + 0.1
    p[zero] = 0
    return (p / p.sum()).float()


@pytest.mark.parametrize("index", [0, 9, 2**40])
def test_no_seed_picks_a_zero_probability_id(index):
    """Seeds crafted to give the largest uniform to a padding id past the vocabulary, to a removed
    token, and (in the block race) to a block whose tokens are all removed: the winner always has
    positive probability."""
    # One block: a 40-token vocabulary pads ids 40..511; id 100 is padding, id 5 a removed token.
    probs = _spread(40, 1, zero=[5, 17])
    for target in (100, 5, 511):
        seed = craft_seed(index, TOKEN_STAGE, target)
        token = int(noise.race(probs[None], seed, index)[0])
        assert token < 40 and probs[token] > 0, (target, token)
    # Several blocks: block 0 holds nearly all the mass (so its token race runs) and has a removed id;
    # block 2 (ids 1024..1099, then padding) has none at all.
    probs = _spread(1100, 2, zero=[3, *range(1024, 1100)])
    probs[:512] *= 1000
    probs /= probs.sum()
    seed = craft_seed(index, TOKEN_STAGE, 3)
    assert probs[int(noise.race(probs[None], seed, index)[0])] > 0
    seed = craft_seed(index, BLOCK_STAGE, 2)
    winner = int(noise.race(probs[None], seed, index)[0])
    assert winner < 1024 and probs[winner] > 0


def test_the_sampler_never_emits_a_filtered_token_or_a_held_back_end():
    """The same through the sampler: top-k filtering, an end-of-sequence held back by ``min_new_tokens``,
    and ids past a vocabulary that is not a multiple of the block size."""
    vocab, index = 40, 30
    logits = torch.linspace(3.0, -3.0, vocab)  # id 0 most likely; top-k 5 keeps ids 0..4
    eos = 2
    for target, kw in [(20, dict(top_k=5)), (eos, {}), (300, {})]:
        seed = craft_seed(index, TOKEN_STAGE, target)
        sampler = Sampler(SamplingParams(1.0, **kw), mode="keyed", seed=seed, eos_ids=frozenset({eos}), min_length=31)
        token = int(sampler.choose(logits[None], index)[0])
        assert token < (5 if kw else vocab) and token != eos, (target, token)
        assert sampler.accept(torch.tensor([token]), None, logits.expand(2, vocab), index)[0] == 1


# ----------------------------------------------------------------------------- stop strings


def compositions(n: int):
    """Every way of cutting ``n`` tokens into consecutive rounds (as lists of round sizes)."""
    for cuts in itertools.product([False, True], repeat=n - 1):
        sizes, size = [], 1
        for cut in cuts:
            if cut:
                sizes.append(size)
                size = 1
            else:
                size += 1
        yield [*sizes, size]


def decode_in_rounds(tok, ids: list[int], sizes: list[int], stop: tuple[str, ...]):
    """Feed ``ids`` round by round as the decoding loop does: (tokens kept, text, pieces shown)."""
    dec = IncrementalDecoder(tok, stop)
    kept, pieces, at = [], [], 0
    for size in sizes:
        new = ids[at : at + size]
        at += size
        piece, cut = dec.add(new)
        pieces.append(piece)
        if cut is not None:
            kept += new[: cut + 1]
            break
        kept += new
    else:
        pieces.append(dec.flush())
    return tuple(kept), dec.text, "".join(pieces)


STOP_CASES = [("中",), ("中 b",), ("a 中",), ("op",), ("p x",), ("\ufffd",), ("zz",)]


@pytest.mark.parametrize("stop", STOP_CASES)
def test_stop_strings_do_not_depend_on_rounds(stop):
    """With byte fallback, "中" is three byte tokens whose text is "a " + U+FFFD, then U+FFFD U+FFFD,
    then "中": the text shrinks. Every grouping of the tokens into rounds stops at the same token, with
    the same text and the same streamed pieces, and where transformers' stop_strings stops."""
    from transformers.generation.stopping_criteria import StopStringCriteria

    tok = byte_fallback_tokenizer()
    ids = tok("a 中 b stop x", add_special_tokens=False)["input_ids"]
    assert sum(tok.convert_ids_to_tokens(i).startswith("<0x") for i in ids) == 3
    outcomes = {decode_in_rounds(tok, ids, sizes, stop) for sizes in compositions(len(ids))}
    assert len(outcomes) == 1, outcomes
    (kept, text, shown) = outcomes.pop()
    criteria = StopStringCriteria(tok, list(stop))
    hf_stop = next((i + 1 for i in range(len(ids)) if bool(criteria(torch.tensor([ids[: i + 1]]), None)[0])), None)
    if "\ufffd" in stop[0]:  # transformers never matches a replacement character; we stop on the first one
        first = next(i + 1 for i in range(len(ids)) if "\ufffd" in tok.decode(ids[: i + 1]))
        assert len(kept) == first and text == tok.decode(ids[:first]).split("\ufffd")[0]
    elif hf_stop is None:
        assert list(kept) == ids and text == tok.decode(ids)
    else:
        assert len(kept) == hf_stop, (kept, hf_stop)
        full = tok.decode(ids[:hf_stop])
        assert text == full[: full.find(stop[0])]
    assert shown == text


# ----------------------------------------------------------------------------- an independent reference

REF_METHODS = [
    dict(method="ar"),
    dict(method="clasp", num_skip=2, draft_exit_threshold=0.0, max_draft_tokens=8, layer_opt_interval=2),
    dict(method="static", skip_layers=(1, 3), draft_exit_threshold=0.0, max_draft_tokens=8),
    dict(method="pld", lookup_min_ngram=1, lookup_max_tokens=8),
    dict(method="hybrid", max_draft_tokens=8, hybrid_max_lookup=8, draft_exit_threshold=0.0),
    dict(method="clasp", num_skip=1, draft_vocab=600, draft_quant="int8", draft_exit_threshold=0.0),
]
SAMPLING = [dict(temperature=0.0), dict(temperature=0.9, top_k=60, seed=11), dict(temperature=1.0, seed=2**64 - 5)]


@pytest.fixture(scope="module")
def tok_1300():
    return byte_fallback_tokenizer(extra_words=1300 - 280)


def check_against_reference(arch: str, sampling: dict, tok, model_seed: int = 4, methods=REF_METHODS) -> None:
    """Every method's tokens equal the reference loop's, with no end-of-sequence, with two of them and
    ``min_new_tokens`` holding one back, and with a stop string taken from the reference's own text."""
    vocab = len(tok)
    model = tiny_model(arch, seed=model_seed, vocab=vocab, layers=5)
    prompt = random_prompt(70 + model_seed, 9, vocab) * 2
    ref_kw = dict(temperature=sampling["temperature"], top_k=sampling.get("top_k", 0), seed=sampling.get("seed", 0))
    free = reference_generate(model, prompt, max_new_tokens=40, **ref_kw)
    eos = frozenset({free[10], free[25]})
    stop_text = tok.decode(free[20:22], skip_special_tokens=True)
    scenarios = [
        dict(max_new_tokens=40),
        dict(max_new_tokens=40, eos=eos, min_new_tokens=18),
        dict(max_new_tokens=40, stop=(stop_text,)),
    ]
    for scenario in scenarios:
        scenario = dict(scenario)
        eos_here = scenario.pop("eos", frozenset())
        ref = reference_generate(model, prompt, eos=eos_here, tokenizer=tok, **ref_kw, **scenario)
        for options in methods:
            cfg = GenerationConfig(**sampling, **scenario, **options)
            out, _ = run_tokens(model, prompt, cfg, eos=eos_here, tokenizer=tok)
            assert out == ref, (arch, sampling, scenario, options)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
@pytest.mark.parametrize("sampling", range(len(SAMPLING)))
def test_every_method_equals_an_independent_reference(arch, sampling, tok_1300):
    """Three race blocks (1300 ids), end-of-sequence ids and ``min_new_tokens``, a stop string, drafts of
    up to 8 tokens: every method's tokens equal the reference loop's, token for token."""
    assert len(tok_1300) > 2 * noise.BLOCK
    check_against_reference(arch, SAMPLING[sampling], tok_1300)


# ----------------------------------------------------------------------------- the race on several blocks


def multi_block_probs() -> torch.Tensor:
    """1300 ids in three blocks, mass in all of them: id 0 has 0.30, block 1 and block 2 carry most of the
    rest, a few ids are zero."""
    g = torch.Generator().manual_seed(5)
    p = torch.rand(1300, generator=g, dtype=torch.float64) ** 3
    p[[7, 600, 1299]] = 0
    p[0] = 0
    p = 0.70 * p / p.sum()
    p[0] = 0.30
    return p.float()


def race_pvalue(n: int = 20000, first_index: int = 0, seed: int = 77) -> float:
    probs = multi_block_probs()
    winners = noise.race(probs.expand(n, -1).contiguous(), seed=seed, first_index=first_index)
    counts = torch.bincount(winners, minlength=probs.shape[0]).double()
    assert counts[probs == 0].sum() == 0
    return chi_square_pvalue(counts, probs.double() * n)


def test_the_race_is_exact_on_several_blocks():
    assert race_pvalue() > ALPHA


def test_reusing_the_block_keys_for_the_tokens_fails_the_race_test(monkeypatch):
    """The planted bug: the token race draws with the block race's keys (so id 0 shares its noise with
    block 0 and wins half the time instead of 30%)."""
    keys = noise._row_keys
    monkeypatch.setattr(noise, "_row_keys", lambda seed, first, n, stage, dev: keys(seed, first, n, BLOCK_STAGE, dev))
    assert race_pvalue() < ALPHA


# ----------------------------------------------------------------------------- min_new_tokens, every position


HOLD_METHODS = [
    dict(method="ar"),
    dict(method="clasp", num_skip=1, draft_exit_threshold=0.0, max_draft_tokens=8),
    dict(method="pld", lookup_min_ngram=1, lookup_max_tokens=8),
    dict(method="static", skip_layers=(2,), draft_exit_threshold=0.0, max_draft_tokens=8),
    dict(method="hybrid", max_draft_tokens=8, hybrid_max_lookup=8, draft_exit_threshold=0.0),
    dict(method="clasp", num_skip=1, draft_vocab=50, draft_exit_threshold=0.0, max_draft_tokens=8),
    dict(method="clasp", num_skip=1, draft_quant="int8", draft_exit_threshold=0.0, max_draft_tokens=8),
]


def check_min_new_tokens(sampling: dict, model_seed: int = 6, methods=HOLD_METHODS) -> None:
    """Half the vocabulary ends the sequence; 24 held-back positions, rounds of up to 8 drafts: no method
    emits one of them early, and each equals the reference."""
    vocab = 97
    model = tiny_model("qwen2", seed=model_seed, vocab=vocab, layers=4)
    eos = frozenset(range(3, vocab, 2))
    prompt = random_prompt(38 + model_seed, 8, vocab) * 2
    ref = reference_generate(
        model, prompt, max_new_tokens=32, eos=eos, min_new_tokens=24, **{"temperature": 0.0, **sampling}
    )
    assert len(ref) > 24 and not set(ref[:24]) & eos
    for options in methods:
        cfg = GenerationConfig(max_new_tokens=32, min_new_tokens=24, **sampling, **options)
        out, gen = run_tokens(model, prompt, cfg, eos=eos)
        assert out == ref, options
        if options["method"] != "ar":
            assert max(gen.stats.draft_lengths) >= 4, options  # long drafts really ran


def long_drafts(monkeypatch) -> None:
    """``hybrid``'s controller drafts as long as it may, from prompt lookup and the layer-skip draft in
    turn, whatever the machine's measured costs would choose."""
    from clasp_decoding.drafting.base import Source
    from clasp_decoding.drafting.controller import Controller, Decision

    turn = itertools.count()

    def plan(self, num_skip, lookup_len, budget, match_len=1, layer_skip=True, suffix_len=0, suffix_match=1):
        if budget <= 0:
            return Decision(Source.PLAIN, 0, 1.0)
        if lookup_len and next(turn) % 2:
            return Decision(Source.LOOKUP, min(lookup_len, budget), 1.0)
        return Decision(Source.LAYER_SKIP, min(8, budget), 1.0)

    monkeypatch.setattr(Controller, "plan", plan)


@pytest.mark.parametrize("sampling", [dict(), dict(temperature=1.0, seed=3)])
def test_min_new_tokens_holds_every_position_under_long_drafts(sampling, monkeypatch):
    """Without the hold, the first token would nearly always end the sequence: every one of the 24
    held-back positions, in rounds of up to 8 drafts, must avoid all end ids, for every method."""
    long_drafts(monkeypatch)
    check_min_new_tokens(sampling)


def test_drafts_through_a_head_hold_back_end_of_sequence_too(monkeypatch):
    """A reduced-vocabulary or quantized draft head once proposed held-back end-of-sequence ids (wasted
    drafts, rejected by verification): now no draft proposes one before ``min_new_tokens``."""
    from clasp_decoding.drafting.layer_skip import LayerSkipDrafter

    vocab = 97
    model = tiny_model("qwen2", seed=6, vocab=vocab, layers=4)
    eos = frozenset(range(3, vocab, 2))
    prompt = random_prompt(44, 8, vocab) * 2
    seen: list[tuple[int, list[int]]] = []
    propose = LayerSkipDrafter.propose

    def watched(self, state, max_tokens):
        draft = propose(self, state, max_tokens)
        seen.append((state.generated, list(draft.tokens)))
        return draft

    monkeypatch.setattr(LayerSkipDrafter, "propose", watched)
    for head in (dict(draft_vocab=50), dict(draft_quant="int8"), dict(draft_quant="int4")):
        seen.clear()
        cfg = GenerationConfig(
            max_new_tokens=32, min_new_tokens=24, method="clasp", num_skip=1, draft_exit_threshold=0.0, **head
        )
        run_tokens(model, prompt, cfg, eos=eos)
        held = [t for generated, tokens in seen for j, t in enumerate(tokens) if generated + j < 24]
        assert held and not set(held) & eos, head


def test_the_hf_baseline_keeps_min_new_tokens():
    from clasp_decoding.baselines import hf_generation_config

    cfg = GenerationConfig(max_new_tokens=20, min_new_tokens=7)
    assert hf_generation_config(cfg, {2}, 0).min_new_tokens == 7


def test_warp_agrees_with_the_reference_warp_bit_for_bit():
    """The reference loop warps with transformers' processors: for temperature and top-k, the very same
    bits as the engine's warp (so the race sees identical probabilities)."""
    from reference import _warp

    logits = torch.randn(1300) * 4
    for t, k in [(0.9, 60), (1.0, 0), (0.5, 5)]:
        assert torch.equal(warp(logits[None], SamplingParams(t, k))[0], _warp(logits, t, k, 1.0))
