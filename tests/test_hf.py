"""``model.generate(..., custom_generate=clasp_generate)``: the one-argument switch for Hugging Face users."""

from __future__ import annotations

import pytest
import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from clasp_decoding.context import model_state
from clasp_decoding.errors import ConfigError
from clasp_decoding.hf import clasp_generate
from conftest import ARCHS, random_prompt, tiny_model


def prepared(arch: str, seed: int = 1):
    """A model that already carries the project's numerics, so its own generate is the exact reference."""
    model = tiny_model(arch, seed=seed)
    model_state(model)
    return model


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_equals_generate(arch):
    model = prepared(arch)
    ids = torch.tensor([random_prompt(40, 9) * 2])
    ref = model.generate(ids, max_new_tokens=30, do_sample=False, pad_token_id=0)
    for options in ({}, {"clasp_method": "clasp", "num_skip": 2, "draft_exit_threshold": 0.0}, {"clasp_method": "pld"}):
        out = model.generate(
            ids, max_new_tokens=30, do_sample=False, pad_token_id=0, custom_generate=clasp_generate, **options
        )
        assert torch.equal(out, ref), (arch, options)
    by_length = model.generate(
        ids, max_length=ids.shape[1] + 12, do_sample=False, pad_token_id=0, custom_generate=clasp_generate
    )
    assert torch.equal(by_length, ref[:, : ids.shape[1] + 12])


def test_left_padding_with_an_attention_mask():
    model = prepared("llama")
    prompt = random_prompt(41, 11)
    ref = model.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, pad_token_id=0)
    padded = torch.tensor([[0, 0, 0, *prompt]])
    mask = torch.tensor([[0, 0, 0] + [1] * len(prompt)])
    out = model.generate(
        padded, attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=0, custom_generate=clasp_generate
    )
    assert out.shape == (1, 3 + len(prompt) + 20)
    assert torch.equal(out[0, :3], torch.zeros(3, dtype=torch.long)) and torch.equal(out[0, 3:], ref[0])


def test_a_seed_reproduces_the_sample_for_every_method():
    from transformers import set_seed

    model = prepared("qwen2")
    ids = torch.tensor([random_prompt(42, 8) * 2])
    kw = dict(
        max_new_tokens=24, do_sample=True, temperature=0.8, top_k=20, pad_token_id=0, custom_generate=clasp_generate
    )
    torch.manual_seed(7)
    first = model.generate(ids, **kw)
    set_seed(7)
    again = model.generate(ids, **kw)
    torch.manual_seed(7)
    plain = model.generate(ids, clasp_method="ar", **kw)
    torch.manual_seed(8)
    other = model.generate(ids, **kw)
    assert torch.equal(first, again) and torch.equal(first, plain) and not torch.equal(first, other)


def test_min_new_tokens_and_stopping_criteria_like_generate():
    model = prepared("llama", seed=2)
    ids = torch.tensor([random_prompt(43, 7)])
    free = model.generate(ids, max_new_tokens=30, do_sample=False, pad_token_id=0)[0, 7:].tolist()
    eos = free[4]
    kw = dict(max_new_tokens=30, do_sample=False, pad_token_id=0, eos_token_id=eos)
    for extra in ({}, {"min_new_tokens": 12}):
        ref = model.generate(ids, **kw, **extra)
        assert torch.equal(model.generate(ids, custom_generate=clasp_generate, **kw, **extra), ref), extra

    class StopAt(StoppingCriteria):
        def __init__(self, token: int) -> None:
            self.token = token

        def __call__(self, input_ids, scores, **kwargs):
            return input_ids[:, -1] == self.token

    stop = StoppingCriteriaList([StopAt(free[9])])
    ref = model.generate(ids, max_new_tokens=30, do_sample=False, pad_token_id=0, stopping_criteria=stop)
    out = model.generate(
        ids, max_new_tokens=30, do_sample=False, pad_token_id=0, stopping_criteria=stop, custom_generate=clasp_generate
    )
    assert torch.equal(out, ref) and out[0, -1] == free[9]


def test_a_streamer_receives_the_text(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer, TextIteratorStreamer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)  # loaded by transformers, not by this project
    ids = tok("A hash table maps", return_tensors="pt")
    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    out = model.generate(**ids, max_new_tokens=20, do_sample=False, streamer=streamer, custom_generate=clasp_generate)
    text = "".join(streamer)
    assert text and text == tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    dict_out = model.generate(**ids, max_new_tokens=5, return_dict_in_generate=True, custom_generate=clasp_generate)
    assert dict_out.sequences.shape == (1, ids["input_ids"].shape[1] + 5)


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(num_beams=2), "num_beams"),
        (dict(output_scores=True, return_dict_in_generate=True), "output_scores"),
        (dict(repetition_penalty=1.3), "RepetitionPenaltyLogitsProcessor"),
        (dict(no_repeat_ngram_size=2), "NoRepeatNGram"),
        (dict(clasp_method="medusa"), "Unknown method 'medusa'"),
        (dict(num_skip=99), "num_skip=99"),
    ],
)
def test_options_it_cannot_honour_are_refused_by_name(kwargs, needle):
    model = prepared("llama")
    ids = torch.tensor([random_prompt(44, 6)])
    with pytest.raises(ConfigError, match=needle):
        model.generate(ids, max_new_tokens=5, pad_token_id=0, custom_generate=clasp_generate, **kwargs)
    with pytest.raises(ConfigError, match="one sequence at a time; got a batch of 2"):
        model.generate(torch.cat([ids, ids]), max_new_tokens=5, pad_token_id=0, custom_generate=clasp_generate)
