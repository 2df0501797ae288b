"""Greedy output is identical, token for token, to transformers' own greedy generate."""

from __future__ import annotations

import pytest
import torch

from clasp_decoding.config import GenerationConfig
from clasp_decoding.errors import InputError
from conftest import ARCHS, hf_greedy, random_prompt, run_tokens, tiny_model


def run(model, prompt, cfg: GenerationConfig, eos=(), chunks=None):
    return run_tokens(model, prompt, cfg, eos, chunks)


SETTINGS = [
    dict(method="clasp", num_skip=1, draft_exit_threshold=0.0, max_draft_tokens=4, layer_opt_interval=1),
    dict(method="clasp", num_skip=2, draft_exit_threshold=0.3, max_draft_tokens=8, layer_opt_interval=3),
    dict(method="clasp", num_skip=3, draft_exit_threshold=0.0, max_draft_tokens=2, layer_opt_interval=16),
    dict(method="static", skip_layers=(1, 3), draft_exit_threshold=0.0, max_draft_tokens=6),
    dict(method="clasp", num_skip=2, draft_exit_threshold=0.0, draft_vocab=40),
    dict(method="pld", lookup_min_ngram=1, lookup_max_ngram=3),
    dict(method="ar"),
]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("setting", range(len(SETTINGS)))
def test_matches_hf_generate(arch, setting):
    kw = SETTINGS[setting]
    for seed in range(3):
        model = tiny_model(arch, seed=seed)
        prompt = random_prompt(100 + seed, 5 + 4 * seed)
        ref = hf_greedy(model, prompt, 40)
        out, session = run(model, prompt, GenerationConfig(max_new_tokens=40, **kw))
        assert out == ref, (arch, kw, seed)
        st = session.stats
        assert st.new_tokens == 40
        assert st.steps == 1 + len(st.accepted_lengths) == 1 + len(st.draft_lengths)
        assert all(a <= k for a, k in zip(st.accepted_lengths, st.draft_lengths, strict=True))
        if kw["method"] in ("clasp", "static"):
            assert max(st.draft_lengths) <= kw.get("max_draft_tokens", GenerationConfig().max_draft_tokens)


@pytest.mark.parametrize("arch", ARCHS)
def test_matches_hf_generate_in_bf16(arch):
    """bf16 is where batched verification differs from one-token steps unless attention is row-exact."""
    for seed in range(4):
        model = tiny_model(arch, seed=seed, dtype=torch.bfloat16)
        prompt = random_prompt(200 + seed, 12)
        ref = hf_greedy(model, prompt, 48)
        for kw in SETTINGS[:2]:
            out, _ = run(model, prompt, GenerationConfig(max_new_tokens=48, **kw))
            assert out == ref, (arch, seed, kw)


def test_drafts_do_get_accepted():
    """The tests above would pass vacuously if every draft were rejected; make sure they are not."""
    model = tiny_model("llama", seed=0)
    prompt = random_prompt(100, 5)
    _, session = run(model, prompt, GenerationConfig(max_new_tokens=40, **SETTINGS[0]))
    st = session.stats
    assert st.accepted > 0 and st.mean_accepted_tokens > 1.2
    assert st.accepted < st.drafted  # and some are rejected, so rollback is exercised


@pytest.mark.parametrize("arch", ARCHS)
def test_eos_inside_a_draft_stops_exactly_there(arch):
    """Pick as EOS a token the model emits mid-way; CLaSp must stop right after it, like generate does,
    including when the EOS arrives inside an accepted draft rather than as the verifier's own token."""
    seen_inside = 0
    for seed in range(6):
        model = tiny_model(arch, seed=seed)
        prompt = random_prompt(300 + seed, 6)
        free = hf_greedy(model, prompt, 30)
        eos = free[12]
        ref = hf_greedy(model, prompt, 30, eos=eos)
        assert ref[-1] == eos and len(ref) <= 13
        cfg = GenerationConfig(
            max_new_tokens=30, method="clasp", num_skip=1, draft_exit_threshold=0.0, max_draft_tokens=8
        )
        chunks = []
        out, session = run(model, prompt, cfg, eos=[eos], chunks=chunks)
        assert out == ref
        lengths = session.stats.accepted_lengths
        # The last round emitted fewer tokens than it accepted drafts + 1: it was cut at a drafted EOS.
        if lengths and len(chunks[-1]) <= lengths[-1]:
            seen_inside += 1
    assert seen_inside > 0


@pytest.mark.parametrize("max_new", [1, 2, 3, 5, 7, 11, 17])
def test_token_limit_reached_mid_draft(max_new):
    model = tiny_model("qwen2", seed=1)
    prompt = random_prompt(7, 8)
    ref = hf_greedy(model, prompt, max_new)
    for method in ("clasp", "pld"):
        cfg = GenerationConfig(
            max_new_tokens=max_new,
            method=method,
            num_skip=1,
            draft_exit_threshold=0.0,
            max_draft_tokens=8,
            lookup_min_ngram=1,
        )
        out, session = run(model, prompt, cfg)
        assert out == ref
        assert session.stats.new_tokens == max_new


@pytest.mark.parametrize("arch", ARCHS)
def test_prompt_at_the_context_edge(arch):
    """Prompt + new tokens exactly fill the model's context: drafts must not run past it."""
    model = tiny_model(arch, seed=2, max_pos=48)
    prompt = random_prompt(8, 36)
    ref = hf_greedy(model, prompt, 12)
    cfg = GenerationConfig(max_new_tokens=12, method="clasp", num_skip=2, draft_exit_threshold=0.0, max_draft_tokens=8)
    out, _ = run(model, prompt, cfg)
    assert out == ref
    with pytest.raises(InputError, match="exceeds the model's context of 48"):
        run(model, prompt, cfg.updated(max_new_tokens=13))
    with pytest.raises(InputError, match="48 tokens, but the model's context holds 48"):
        run(model, random_prompt(9, 48), cfg)


def test_many_prompts_and_lengths():
    """A broader sweep on one architecture: prompt lengths, skip counts and draft lengths."""
    model = tiny_model("llama", seed=11, layers=8)
    for i in range(12):
        prompt = random_prompt(400 + i, 1 + 3 * i)
        ref = hf_greedy(model, prompt, 32)
        cfg = GenerationConfig(
            max_new_tokens=32,
            method="clasp",
            num_skip=1 + i % 5,
            draft_exit_threshold=(0.0, 0.5, 0.9)[i % 3],
            max_draft_tokens=1 + i % 7,
            layer_opt_interval=1 + i % 4,
        )
        out, _ = run(model, prompt, cfg)
        assert out == ref, i


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eager_attention_matches_hf_generate(arch, dtype):
    """With ``attn_implementation="eager"`` the prefill is one call, as transformers makes it, and each
    verified row is attended as one decoding step is: the output is transformers' own."""
    for seed in range(2):
        model = tiny_model(arch, seed=seed, dtype=dtype, attn_implementation="eager")
        assert model.config._attn_implementation == "eager"
        prompt = random_prompt(800 + seed, 11)
        ref = hf_greedy(model, prompt, 32)
        for kw in (SETTINGS[0], SETTINGS[5]):
            out, _ = run(model, prompt, GenerationConfig(max_new_tokens=32, **kw))
            assert out == ref, (arch, dtype, seed, kw)
        assert model.config._attn_implementation == "clasp_eager"


def test_flash_attention_is_switched_to_sdpa_with_a_warning():
    """A backend that would read the runner's 4D masks as padding masks is replaced, and says so."""
    from clasp_decoding.runner import ModelRunner

    model = tiny_model("llama", seed=1)
    prompt = random_prompt(5, 9)
    ref = hf_greedy(model, prompt, 24)
    model.config._attn_implementation = "flash_attention_2"  # what a model loaded with flash attention has
    with pytest.warns(UserWarning, match="switching this model to 'sdpa'"):
        runner = ModelRunner(model)
    assert model.config._attn_implementation == "clasp_sdpa" and runner.row_exact
    out, _ = run_tokens(runner, prompt, GenerationConfig(max_new_tokens=24, **SETTINGS[1]))
    assert out == ref
