"""The GPU fast path's static-shape code, run eagerly on the CPU (capture off): same tokens as eager."""

from __future__ import annotations

import pytest
import torch

from clasp_decoding.config import GenerationConfig
from clasp_decoding.context import use_graphs
from clasp_decoding.errors import InputError
from clasp_decoding.runner import ModelRunner
from conftest import ARCHS, hf_greedy, random_prompt, run_tokens, scratch_cache, tiny_model


@pytest.mark.parametrize("arch", ARCHS)
def test_static_forward_matches_eager_runner(arch):
    model = tiny_model(arch, seed=1)
    eager = ModelRunner(model)
    ids = torch.tensor(random_prompt(1, 40))  # longer than the largest bucket: the one-call eager path
    ref, ref_hidden = eager.forward(scratch_cache(eager, 64), ids, 0, collect_hidden=True)
    runner = use_graphs(model, capacity=128, capture=False).runner
    cache = runner.new_cache(30, 20)
    logits, hidden = runner.forward(cache, ids[:30], 0, collect_hidden=True)
    torch.testing.assert_close(logits, ref[:30], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(hidden, ref_hidden[:, :30], rtol=1e-4, atol=1e-4)
    cache.rollback(30)
    step, _ = runner.forward(cache, ids[30:37], 30)  # a bucketed call, padded from 7 to 8 rows
    torch.testing.assert_close(step, ref[30:37], rtol=1e-4, atol=1e-4)
    cache.rollback(37)
    last, _ = runner.forward(cache, ids[37:38], 37, last_only=True)
    torch.testing.assert_close(last, ref[37:38], rtol=1e-4, atol=1e-4)


def test_static_candidates_match_eager_candidates():
    model = tiny_model("qwen2", seed=2)
    eager = ModelRunner(model)
    ids = torch.tensor(random_prompt(2, 12))
    c1 = scratch_cache(eager, 64)
    _, hidden = eager.forward(c1, ids, 0, collect_hidden=True)
    c1.rollback(12)
    states = torch.randn(3, model.config.hidden_size)
    ref = eager.layer_candidates(c1, 2, states, 11)
    runner = use_graphs(model, capacity=64, capture=False).runner
    c2 = runner.new_cache(12, 20)
    runner.forward(c2, ids, 0)
    c2.rollback(12)
    torch.testing.assert_close(runner.layer_candidates(c2, 2, states, 11), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["clasp", "ar", "pld", "hybrid"])
def test_static_path_generates_the_same_tokens(arch, method):
    for seed in range(2):
        model = tiny_model(arch, seed=seed)
        prompt = random_prompt(700 + seed, 7) * 2
        ref = hf_greedy(model, prompt, 40)
        use_graphs(model, capacity=128, capture=False)
        cfg = GenerationConfig(
            max_new_tokens=40,
            method=method,
            num_skip=2,
            draft_exit_threshold=0.0,
            layer_opt_interval=3,
            lookup_min_ngram=1,
        )
        out, _ = run_tokens(model, prompt, cfg)
        assert out == ref, (arch, method, seed)


def test_capacity_is_enforced():
    model = tiny_model("llama", seed=3)
    runner = use_graphs(model, capacity=32, capture=False).runner
    with pytest.raises(InputError, match="static cache of 32 tokens"):
        runner.new_cache(20, 13)
    runner.release_cache(runner.new_cache(20, 12))  # exactly full: served


def test_an_80_layer_model_with_half_its_layers_skipped():
    """A 70B-class depth: the DP sends up to 40 candidates per layer, more than one candidate call holds
    (32), so they go in chunks; greedy output through the static-shape runner equals transformers'."""
    model = tiny_model(
        "llama", seed=5, layers=80, hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1
    )
    prompt = random_prompt(81, 9) * 2
    ref = hf_greedy(model, prompt, 20)
    state = use_graphs(model, capacity=128, capture=False)
    assert state.runner.max_candidates == 32
    for method in ("clasp", "hybrid"):
        cfg = GenerationConfig(
            max_new_tokens=20, method=method, num_skip=40, draft_exit_threshold=0.0, layer_opt_interval=2
        )
        out, gen = run_tokens(model, prompt, cfg)
        assert out == ref, method
        assert gen.stats.layer_selections >= 1 and all(len(s) == 40 for _, s in gen.stats.skip_sets)


def test_graph_runner_tells_the_truth_about_its_numerics():
    model = tiny_model("qwen2", seed=6)
    with pytest.warns(UserWarning, match="not bit-identical"):
        runner = use_graphs(model, capacity=64, capture=False).runner
    assert not runner.numerics.attention_rowwise and not runner.numerics.exact
    assert runner.numerics.max_verify_drafts is None  # no exactness to keep: no cap either


def test_interleaved_generations_each_own_their_cache():
    """Two stream() generators consumed alternately: on the eager runner each has its own cache and both
    give their own text; the graph runner's one static cache refuses the second with a clear error
    (instead of letting the two overwrite each other), and serves again once the first is done."""
    from clasp_decoding import stream
    from clasp_decoding.errors import RunnerBusyError

    model = tiny_model("llama", seed=7)
    a_prompt, b_prompt = random_prompt(90, 8), random_prompt(91, 12)
    a_ref, b_ref = hf_greedy(model, a_prompt, 24), hf_greedy(model, b_prompt, 24)

    def tokens_of(gen):
        return [t for chunk in gen for t in chunk.token_ids]

    from clasp_decoding.api import generation

    a = generation(model, None, a_prompt, max_new_tokens=24, method="clasp", draft_exit_threshold=0.0)
    b = generation(model, None, b_prompt, max_new_tokens=24, method="pld")
    got_a, got_b = [], []
    while not (a.done and b.done):  # one round of each in turn, on the same runner
        for gen, got in ((a, got_a), (b, got_b)):
            chunk = gen.step()
            if chunk is not None:
                got += chunk.token_ids
    assert got_a == a_ref and got_b == b_ref

    use_graphs(model, capacity=64, capture=False)
    first = generation(model, None, a_prompt, max_new_tokens=24)
    next(iter(first))
    with pytest.raises(RunnerBusyError, match="already serves a live generation"):
        generation(model, None, b_prompt, max_new_tokens=24)
    first.close()
    assert tokens_of(generation(model, None, b_prompt, max_new_tokens=24)) == b_ref
    assert "".join(stream(model, None, a_prompt, max_new_tokens=4)) == ""  # no tokenizer: ids only, no text
