"""The runner drives the model's own modules and must reproduce ``model(...)`` exactly."""

from __future__ import annotations

import pytest
import torch

from clasp_decoding.draft_head import VocabSubset
from clasp_decoding.errors import UnsupportedModelError
from clasp_decoding.families import check_supported
from clasp_decoding.runner import ModelRunner
from conftest import ARCHS, random_prompt, scratch_cache, tiny_model


@pytest.mark.parametrize("arch", ARCHS)
def test_prefill_reproduces_model_logits(arch):
    model = tiny_model(arch, seed=1)
    runner = ModelRunner(model)
    ids = torch.tensor(random_prompt(1, 24))  # longer than gemma3's sliding window of 8
    with torch.inference_mode():
        ref = model(ids[None]).logits[0].float()
    logits, hidden = runner.forward(scratch_cache(runner, 32), ids, 0, collect_hidden=True)
    assert torch.equal(logits, ref)  # transformers' own prefill on the installed model: the same kernel
    assert hidden.shape == (runner.num_layers + 1, 24, model.config.hidden_size)


@pytest.mark.parametrize("arch", ARCHS)
def test_incremental_and_chunked_match_full_forward(arch):
    model = tiny_model(arch, seed=2)
    runner = ModelRunner(model)
    ids = torch.tensor(random_prompt(2, 30))
    with torch.inference_mode():
        ref = model(ids[None]).logits[0].float()
    cache = scratch_cache(runner, 40)
    runner.forward(cache, ids[:10], 0)
    cache.rollback(10)
    chunk, _ = runner.forward(cache, ids[10:20], 10)
    cache.rollback(20)
    steps = []
    for t in range(20, 30):
        logits, _ = runner.forward(cache, ids[t : t + 1], t, last_only=True)
        cache.rollback(t + 1)
        steps.append(logits[0])
    torch.testing.assert_close(chunk, ref[10:20], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.stack(steps), ref[20:30], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("arch", ARCHS)
def test_a_prompt_gives_the_same_bits_whole_in_chunks_or_token_by_token(arch, dtype):
    """Every row of every call is attended on its own (and every linear layer is row-invariant), so a
    prompt's logits and cache do not depend on how it was cut: one prefill, chunks of any size, or one
    token at a time. Prefix reuse and chunked prefill rely on it. (Gemma-3's sliding window of 8 is
    shorter than the prompt.)"""
    model = tiny_model(arch, seed=4, dtype=dtype)
    runner = ModelRunner(model)
    ids = torch.tensor(random_prompt(4, 29))

    def run(cuts):
        cache = scratch_cache(runner, 40)
        rows, start = [], 0
        for end in [*cuts, 29]:
            logits, _ = runner.forward(cache, ids[start:end], start)
            cache.rollback(end)
            rows.append(logits)
            start = end
        return torch.cat(rows), [
            (k[:, :, :29].clone(), v[:, :, :29].clone()) for k, v in zip(cache.keys, cache.values, strict=True)
        ]

    whole_logits, whole_cache = run([])
    for cuts in ([7, 19], [1, 2, 3, 16], list(range(1, 29))):
        logits, cache = run(cuts)
        assert torch.equal(logits, whole_logits), cuts
        for (k1, v1), (k2, v2) in zip(cache, whole_cache, strict=True):
            assert torch.equal(k1, k2) and torch.equal(v1, v2), cuts


@pytest.mark.parametrize("arch", ARCHS)
def test_layer_subset_equals_model_with_layers_removed(arch):
    """Running a subset of layers is the same as a model whose other layers are gone."""
    model = tiny_model(arch, seed=3)
    runner = ModelRunner(model)
    keep = [0, 2, 3, 5]
    ids = torch.tensor(random_prompt(3, 12))
    logits, _ = runner.forward(scratch_cache(runner, 16), ids, 0, layers=keep)
    full_layers = model.model.layers
    try:
        model.model.layers = torch.nn.ModuleList([full_layers[i] for i in keep])
        model.config.num_hidden_layers = len(keep)
        if getattr(model.config, "layer_types", None):
            types = model.config.layer_types
            model.config.layer_types = [types[i] for i in keep]
        with torch.inference_mode():
            ref = model(ids[None], use_cache=False).logits[0].float()
    finally:
        model.model.layers = full_layers
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_layer_candidates_are_independent_and_leave_the_cache_alone(arch):
    model = tiny_model(arch, seed=4)
    runner = ModelRunner(model)
    ids = torch.tensor(random_prompt(4, 14))
    pos = 13
    cache = scratch_cache(runner, 40)
    _, hidden = runner.forward(cache, ids, 0, collect_hidden=True)
    cache.rollback(14)
    before = [(k[:, :, :14].clone(), v[:, :, :14].clone()) for k, v in zip(cache.keys, cache.values, strict=True)]
    layer = 3
    true_in = hidden[layer, pos]  # h_{layer} of the last token = input of layer index `layer`
    others = torch.randn(3, true_in.shape[0])
    states = torch.cat([true_in[None], others])
    together = runner.layer_candidates(cache, layer, states, pos)
    # A candidate equal to the real input reproduces the real output of that layer.
    torch.testing.assert_close(together[0], hidden[layer + 1, pos], rtol=1e-4, atol=1e-4)
    # Side by side equals one at a time: candidates do not see each other.
    for j in range(4):
        alone = runner.layer_candidates(cache, layer, states[j : j + 1], pos)
        torch.testing.assert_close(together[j], alone[0], rtol=1e-5, atol=1e-5)
    for (k0, v0), k, v in zip(before, cache.keys, cache.values, strict=True):
        assert torch.equal(k0, k[:, :, :14]) and torch.equal(v0, v[:, :, :14])


def test_vocab_subset_projects_the_chosen_rows():
    model = tiny_model("llama", seed=5)
    runner = ModelRunner(model)
    h = torch.randn(2, model.config.hidden_size)
    subset = VocabSubset(runner.head, 20, extra=[50, 3, 60, 60])
    assert subset.ids.tolist() == list(range(20)) + [50, 60]
    with torch.inference_mode():
        full = runner.logits(h)
        part = runner.logits(h, subset)
    torch.testing.assert_close(part, full[:, subset.ids])
    probs = torch.softmax(part, -1)
    spread = subset.to_full(probs)
    assert spread.shape == full.shape and torch.allclose(spread.sum(-1), torch.ones(2))
    assert torch.equal(spread[:, subset.ids], probs)


def test_unsupported_architectures_are_refused_clearly():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel is not supported"):
        check_supported(model)
    with pytest.raises(UnsupportedModelError, match="lacks model, model.embed_tokens|lacks model"):
        ModelRunner(model)


def test_rowwise_attention_backend_leaves_transformers_generate_alone():
    """The row-exact attention backend delegates calls that do not come from the runner unchanged
    (these shapes need no linear padding, so nothing else changes either)."""
    from conftest import hf_greedy

    model = tiny_model("qwen2", seed=6, dtype=torch.bfloat16)
    prompt = random_prompt(6, 9)
    before = hf_greedy(model, prompt, 24)
    runner = ModelRunner(model)
    assert runner.row_exact and model.config._attn_implementation == "clasp_sdpa"
    assert hf_greedy(model, prompt, 24) == before


def test_layer_candidates_refuse_to_overwrite_verified_slots():
    model = tiny_model("llama", seed=7)
    runner = ModelRunner(model)
    cache = scratch_cache(runner, 40)
    runner.forward(cache, torch.tensor(random_prompt(7, 12)), 0)
    cache.rollback(12)
    with pytest.raises(ValueError, match="would overwrite verified cache slots"):
        runner.layer_candidates(cache, 1, torch.randn(2, model.config.hidden_size), 5)


def test_linear_probe_finds_how_many_rows_stay_exact(monkeypatch):
    """A kernel that changes its summation order past some batch size is caught, with the limit."""
    from clasp_decoding import numerics

    weight = torch.randn(64, 48, dtype=torch.bfloat16)
    plain = torch.nn.functional.linear

    def switching(x, w, b=None):  # exact up to 8 rows, then (like bf16 past 32 rows here) not
        y = plain(x, w, b)
        return y + 1e-2 if x.shape[0] > 8 else y

    monkeypatch.setattr(torch.nn.functional, "linear", switching)
    mode, limit = numerics.probe_linear(weight, None)
    assert limit == 8 and mode != "inexact"


def test_linear_probe_checks_every_row_of_every_batch(monkeypatch):
    """A kernel whose rows 16.. go wrong only in batches of 32 or more rows is caught at 32 (the old probe
    compared the first 16 rows of each batch and missed it)."""
    from clasp_decoding import numerics

    weight = torch.randn(64, 48, dtype=torch.bfloat16)
    plain = torch.nn.functional.linear

    def late_rows(x, w, b=None):
        y = plain(x, w, b)
        if x.shape[0] >= 32:
            y = y.clone()
            y[16:] += 1e-2
        return y

    monkeypatch.setattr(torch.nn.functional, "linear", late_rows)
    mode, limit = numerics.probe_linear(weight, None)
    assert limit == 31 and mode != "inexact"


def test_verification_never_exceeds_the_exact_row_limit():
    from dataclasses import replace

    from clasp_decoding.config import GenerationConfig
    from conftest import hf_greedy, run_tokens

    model = tiny_model("llama", seed=9)
    prompt = random_prompt(9, 7) * 4  # lookup finds long continuations
    runner = ModelRunner(model)
    runner.numerics = replace(runner.numerics, attention_rowwise=True, linear_mode="invariant", max_rows=4)
    assert runner.numerics.max_verify_drafts == 3
    cfg = GenerationConfig(max_new_tokens=30, method="pld", lookup_max_tokens=10)
    out, gen = run_tokens(runner, prompt, cfg)
    assert out == hf_greedy(model, prompt, 30)
    assert max(gen.stats.draft_lengths) == 3


def test_device_map_placement_and_per_layer_devices(tiny_model_dir):
    """``load(..., device_map=...)`` places modules through accelerate; the runner keeps each layer's work
    and cache on that layer's device. This machine has one device, so the second half of the layers is
    declared on ``cpu:0`` (a distinct device object that moves nothing): the runner must move hidden
    states, masks and rotary tables to it per call, collect hidden states back, and still be exact."""
    from clasp_decoding import generate, load
    from clasp_decoding.config import GenerationConfig
    from clasp_decoding.context import runner_for
    from conftest import hf_greedy

    names = [
        "model.embed_tokens",
        "model.rotary_emb",
        *[f"model.layers.{i}" for i in range(6)],
        "model.norm",
        "lm_head",
    ]
    model, tok = load(str(tiny_model_dir), dtype="fp32", device_map={n: "cpu" for n in names})
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    runner = runner_for(model)
    prompt = tok("A hash table maps keys")["input_ids"]
    ref = hf_greedy(model, prompt, 24, eos=tok.eos_token_id)
    other = torch.device("cpu", 0)
    runner.layer_devices = [torch.device("cpu")] * 3 + [other] * 3
    runner.single_device = False
    for method in ("clasp", "hybrid"):
        cfg = GenerationConfig(
            max_new_tokens=24, method=method, num_skip=2, draft_exit_threshold=0.0, layer_opt_interval=2
        )
        res = generate(model, tok, prompt, cfg)
        assert res.token_ids == ref, method
        if method == "clasp":  # (hybrid's controller may not choose layer skip: timings decide)
            assert res.stats.layer_selections >= 1  # the DP's candidate calls crossed the device boundary too
