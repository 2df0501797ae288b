"""The suffix index: drafts from earlier requests' prompts and outputs, voted by frequency, bounded,
scoped, kept across restarts; and generation with it is the text without it."""

from __future__ import annotations

import torch

from clasp_decoding import generate
from clasp_decoding.config import GenerationConfig
from clasp_decoding.suffix_index import SuffixIndex
from conftest import random_prompt, tiny_model


def test_a_draft_follows_what_most_earlier_occurrences_did():
    index = SuffixIndex()
    stem = [5, 6, 7, 8]
    index.add([1, 2, *stem, 10, 11, 12, 13, 3])
    index.add([9, 9, *stem, 10, 11, 12, 14, 4])
    index.add([7, 1, *stem, 10, 11, 20, 21, 2])
    d = index.draft([40, 41, *stem], 6)
    assert d.tokens[:2] == [10, 11] and d.support[:2] == [3, 3]  # all three agree on 10, 11
    assert d.tokens[2] == 12 and d.support[2] == 2  # two of three go on with 12
    assert d.match == 4  # the longest indexed order that matched (the context's last 4 tokens)
    assert index.draft([40, 41, 42, 43], 6) is None  # never seen
    index.min_support = 3
    assert index.draft([40, 41, *stem], 6).tokens == [10, 11]  # stops where fewer than 3 agree


def test_a_draft_never_runs_past_the_end_of_a_sequence():
    index = SuffixIndex()
    index.add([1, 2, 3, 4, 5, 6])
    index.add([9, 9, 9, 9, 9, 9, 9])
    assert index.draft([0, 4, 5], 10).tokens == [6]


def test_scopes_keep_histories_apart():
    index = SuffixIndex()
    index.add([1, 2, 3, 4, 5, 6, 7, 8], scope="alice")
    assert index.draft([2, 3, 4], 3, scope="alice").tokens == [5, 6, 7]
    assert index.draft([2, 3, 4], 3, scope="bob") is None
    assert index.draft([2, 3, 4], 3) is None


def test_memory_is_bounded_least_recently_used_first():
    index = SuffixIndex(max_tokens=400)
    for i in range(25):
        index.add([1000 + i, *range(3, 20)])  # 18 tokens each: the 23rd goes beyond 400
        if i == 19:
            assert index.draft([1001, 3, 4], 2).match == 3  # sequence 1 serves a draft: used recently
    assert index.size <= 400
    # the least recently used went first (only shorter matches, from others, remain for sequence 0's
    # start), not the one that served a draft, nor the newest
    assert index.draft([1000, 3, 4], 2).match == 2
    assert index.draft([1001, 3, 4], 2).match == 3
    assert index.draft([1024, 3, 4], 2).match == 3
    per_token = index.nbytes() / index.size
    assert per_token < 100, per_token  # one token, one scope, per order a hash and a position


def test_it_is_kept_across_restarts(tmp_path):
    index = SuffixIndex()
    index.add([1, 2, 3, 4, 5, 6, 7], scope=("key", "a1b2"))
    index.add([8, 2, 3, 4, 9, 9, 9], scope=None)
    index.save(tmp_path / "index.pt")
    back = SuffixIndex.load(tmp_path / "index.pt")
    assert back.draft([0, 2, 3, 4], 2, scope=("key", "a1b2")).tokens == [5, 6]
    assert back.draft([0, 2, 3, 4], 2).tokens == [9, 9]
    assert back.size == index.size


def test_many_sequences_are_indexed_and_searched_in_bulk():
    """Hash collisions are checked against the tokens, and many additions merge into one sorted index."""
    g = torch.Generator().manual_seed(0)
    index = SuffixIndex()
    seqs = [torch.randint(0, 50, (200,), generator=g).tolist() for _ in range(60)]
    for s in seqs:
        index.add(s)
    for s in seqs[-5:]:
        d = index.draft(s[:120], 8)
        assert d is not None
        # whatever it proposes really followed that context somewhere
        ctx = s[120 - d.match : 120]
        assert any(
            t[i : i + d.match] == ctx and t[i + d.match : i + d.match + 1] == d.tokens[:1]
            for t in seqs
            for i in range(len(t) - d.match)
        )


def test_generation_with_the_index_is_the_text_without_it_and_it_learns():
    """Greedy and seeded: every method with a shared index gives the text it gives without one; a repeated
    request drafts from the first one's output and needs fewer verification steps."""
    model = tiny_model("qwen2", seed=13, dtype=torch.bfloat16, vocab=211)
    prompt = random_prompt(13, 20, 211)
    for sampling in (dict(), dict(temperature=0.8, seed=4)):
        index = SuffixIndex()
        cfg = GenerationConfig(max_new_tokens=40, **sampling)
        for method in ("suffix", "hybrid"):
            plain = generate(model, None, prompt, cfg.updated(method="ar"))
            first = generate(model, None, prompt, cfg.updated(method=method), suffix_index=index)
            again = generate(model, None, prompt, cfg.updated(method=method), suffix_index=index)
            assert first.token_ids == again.token_ids == plain.token_ids, (method, sampling)
            if method == "suffix":
                assert again.stats.accepted > 0 and again.stats.steps < first.stats.steps
    assert index.size > 0


def test_a_live_sequence_is_searchable_as_it_grows_and_its_reserve_is_reclaimed():
    """A generation in progress: its prompt at once, its output round by round (n-grams that span the
    rounds included), never evicted; after its end, the unused reserve goes at the next rebuild and the
    handles of sequences still live stay valid."""
    index = SuffixIndex(max_tokens=1000)
    live = index.begin([1, 2, 3, 4], scope="a", reserve=50)
    assert index.draft([9, 2, 3], 2, scope="a").tokens == [4]  # the prompt, at once
    index.extend(live, [1, 2, 3, 4, 5])
    index.extend(live, [1, 2, 3, 4, 5, 6, 7, 8])
    assert index.draft([9, 4, 5], 3, scope="a").tokens == [6, 7, 8]  # across the rounds' boundary
    assert index.draft([9, 4, 5], 3, scope="b") is None  # scoped like the rest
    other = index.begin([30, 31, 32, 33], scope="a", reserve=2000)
    for i in range(30):  # finished sequences pushed out past the bound; the live ones stay
        index.add([100 + i, *range(200, 240)], scope="a")
    assert index.size <= 1000
    assert index.draft([9, 6, 7], 1, scope="a").tokens == [8]
    index.end(other)  # 2000 slots of slack: more than what is kept, so the arrays are rebuilt
    assert index.corpus.numel() < 1200 and index.slack == 0
    index.extend(live, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10])  # the handle moved with the rebuild
    assert index.draft([9, 8, 9], 1, scope="a").tokens == [10]
    assert index.draft([0, 31, 32], 1, scope="a").tokens == [33]
    index.end(live)
    assert index.draft([9, 8, 9], 1, scope="a").tokens == [10]  # history now


def test_requests_running_side_by_side_draft_from_each_other():
    """Two generations of the same prompt stepped in turn with one index: the later one drafts from the
    earlier one's output while both run, and both give plain decoding's text."""
    from clasp_decoding.api import generation

    model = tiny_model("qwen2", seed=13, dtype=torch.bfloat16, vocab=211)
    prompt = random_prompt(21, 20, 211)
    cfg = GenerationConfig(max_new_tokens=40, method="suffix")
    plain = generate(model, None, prompt, cfg.updated(method="ar")).token_ids
    index = SuffixIndex()
    first = generation(model, None, prompt, cfg, suffix_index=index)
    for _ in range(25):  # the first is well ahead, not done
        first.step()
    second = generation(model, None, prompt, cfg, suffix_index=index)
    while not (first.done and second.done):
        first.step()
        second.step()
    assert first.result().token_ids == second.result().token_ids == plain
    assert second.stats.accepted > 10 and second.stats.steps < first.stats.steps
