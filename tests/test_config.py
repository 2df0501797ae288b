"""Bad parameters and inputs get one clear sentence each."""

from __future__ import annotations

import pytest

from clasp_decoding import ConfigError, GenerationConfig, InputError, generate
from conftest import random_prompt, run_tokens, tiny_model


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(max_new_tokens=0), "max_new_tokens must be a positive integer"),
        (dict(max_new_tokens=-3), "max_new_tokens must be a positive integer"),
        (dict(max_new_tokens=2.5), "max_new_tokens must be a positive integer"),
        (dict(temperature=-0.1), "temperature must be >= 0"),
        (dict(temperature=float("nan")), "temperature must be a finite number"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(top_k=-1), "top_k must be an integer >= 0"),
        (dict(seed=-1), r"seed must be an integer in \[0, 2\*\*64\)"),
        (dict(seed=2**64), r"seed must be an integer in \[0, 2\*\*64\)"),
        (dict(min_new_tokens=200), r"min_new_tokens must be an integer in \[0, max_new_tokens\]"),
        (dict(lookup_max_ngram=17), "lookup_max_ngram must be a positive integer and at most 16"),
        (dict(max_draft_tokens=1000), "max_draft_tokens must be a positive integer and at most 256"),
        (dict(draft_quant="fp4"), "Unknown draft_quant 'fp4'"),
        (dict(stop=5), "stop must be a list"),
        (dict(skip_layers=3), "skip_layers must be a list"),
        (dict(skip_layers=("a",)), "skip_layers must be a list of layer indices"),
        (dict(method="medusa"), "Unknown method 'medusa'"),
        (dict(skip_ratio=1.0), r"skip_ratio must be in \(0, 1\)"),
        (dict(num_skip=0), "num_skip must be a positive integer"),
        (dict(draft_exit_threshold=1.5), r"draft_exit_threshold must be in \[0, 1\]"),
        (dict(max_draft_tokens=0), "max_draft_tokens must be a positive integer"),
        (dict(layer_opt_interval=0), "layer_opt_interval must be a positive integer"),
        (dict(lookup_min_ngram=5, lookup_max_ngram=3), "lookup_min_ngram .5. exceeds lookup_max_ngram .3."),
        (dict(stop=("",)), "stop strings must be non-empty"),
        (dict(draft_vocab=-5), "draft_vocab must be an integer >= 0"),
        (dict(frobnicate=1), "Unknown generation option"),
    ],
)
def test_bad_parameters(changes, message):
    with pytest.raises(ConfigError, match=message):
        GenerationConfig().updated(**changes)


def test_model_dependent_parameters():
    model = tiny_model("llama", layers=6)
    prompt = random_prompt(1, 5)
    with pytest.raises(ConfigError, match="num_skip=6 must be below the model's 6 layers"):
        run_tokens(model, prompt, GenerationConfig(num_skip=6))
    with pytest.raises(ConfigError, match=r"skip_layers \[7\] are not layer indices of a 6-layer model"):
        run_tokens(model, prompt, GenerationConfig(method="static", skip_layers=(1, 7)))
    with pytest.raises(ConfigError, match="leave at least one layer"):
        run_tokens(model, prompt, GenerationConfig(method="static", skip_layers=tuple(range(6))))


def test_bad_prompts(tiny_model_dir):
    from clasp_decoding import load

    model, tokenizer = load(str(tiny_model_dir), dtype="fp32")
    for prompt in ("", "   \n", [], ()):
        with pytest.raises(InputError, match="empty"):
            generate(model, tokenizer, prompt)
    with pytest.raises(InputError, match="outside the vocabulary"):
        generate(model, tokenizer, [5, 10**6])
    with pytest.raises(InputError, match="needs 'role' and 'content'"):
        generate(model, tokenizer, [{"content": "hi"}])
    with pytest.raises(InputError, match="A prompt is a string"):
        generate(model, tokenizer, [1.5, 2.5])
    long = "hash table " * 400
    with pytest.raises(InputError, match="but the model's context holds 512"):
        generate(model, tokenizer, long, raw=True)
    with pytest.raises(InputError, match="ask for at most"):
        generate(model, tokenizer, "hash table", max_new_tokens=600)


def test_a_failed_request_leaves_the_next_one_intact(tiny_model_dir):
    """Errors happen before any state is shared: a good request after bad ones gives the same output."""
    from clasp_decoding import load

    model, tokenizer = load(str(tiny_model_dir), dtype="fp32")
    first = generate(model, tokenizer, "A hash table maps", max_new_tokens=12).token_ids
    for bad in (dict(max_new_tokens=-1), dict(top_p=7), dict(method="x")):
        with pytest.raises(ConfigError):
            generate(model, tokenizer, "A hash table maps", **bad)
    assert generate(model, tokenizer, "A hash table maps", max_new_tokens=12).token_ids == first
