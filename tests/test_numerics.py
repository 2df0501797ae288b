"""What the project installs on a user's model: said once, exact for the model it is on, and undone by
``restore``; the ``generate`` users have (an untouched copy) for baselines; models freed when dropped."""

from __future__ import annotations

import copy
import gc
import warnings
import weakref

import pytest
import torch

from clasp_decoding import NumericsNotice, restore
from clasp_decoding.baselines import pristine_copy
from clasp_decoding.config import GenerationConfig
from clasp_decoding.context import model_state, use_graphs
from clasp_decoding.numerics import _kernel_forward
from conftest import random_prompt, run_tokens, tiny_model


def installed_anything(model) -> bool:
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    kernel = any(getattr(m.__dict__.get("forward"), "__func__", None) is _kernel_forward for m in linears)
    hooks = any(m._forward_pre_hooks or m._forward_hooks for m in linears)
    return kernel or hooks or model.config._attn_implementation.startswith("clasp_")


def plain_greedy(model, prompt: list[int], n: int) -> list[int]:
    """transformers' generate on the model as it is (no installation)."""
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long), max_new_tokens=n,
            do_sample=False, pad_token_id=0, top_k=None, top_p=None, temperature=None,
        )  # fmt: skip
    return out[0, len(prompt) :].tolist()


def logits(model, ids):
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits


def test_restore_gives_the_model_back_as_loaded():
    model = tiny_model("qwen2", seed=3, dtype=torch.bfloat16)
    untouched = copy.deepcopy(model)
    prompt = random_prompt(5, 12)
    before = logits(model, prompt)
    out, _ = run_tokens(model, prompt, GenerationConfig(max_new_tokens=20, method="clasp", num_skip=2))
    assert installed_anything(model)
    assert out == plain_greedy(model, prompt, 20)  # the installed model's generate is the exact reference
    assert restore(model) is True and not installed_anything(model)
    assert model.config._attn_implementation == "sdpa"
    assert torch.equal(logits(model, prompt), before) and torch.equal(logits(untouched, prompt), before)
    assert plain_greedy(model, prompt, 20) == plain_greedy(untouched, prompt, 20)
    assert restore(model) is False  # nothing left to undo
    again, _ = run_tokens(model, prompt, GenerationConfig(max_new_tokens=20, method="clasp", num_skip=2))
    assert again == out and installed_anything(model)  # installed again on next use


def test_a_pristine_copy_is_the_generate_users_have():
    model = tiny_model("llama", seed=4, dtype=torch.bfloat16)
    untouched = copy.deepcopy(model)
    prompt = random_prompt(6, 10)
    run_tokens(model, prompt, GenerationConfig(max_new_tokens=8))
    clone = pristine_copy(model)
    assert installed_anything(model) and not installed_anything(clone)
    assert torch.equal(logits(clone, prompt), logits(untouched, prompt))


def test_the_installation_is_said_once_per_model():
    model = tiny_model("llama", seed=5)
    prompt = random_prompt(7, 6)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(3):
            run_tokens(model, prompt, GenerationConfig(max_new_tokens=4))
    notices = [w for w in seen if issubclass(w.category, NumericsNotice)]
    assert len(notices) == 1 and "restore(model)" in str(notices[0].message)


@pytest.mark.parametrize("graphs", [False, True])
def test_a_dropped_model_is_freed_with_its_state(graphs):
    """The registry never keeps a model alive: after a generation with quantized draft copies (and, on the
    graph runner, its static buffers), dropping the model frees it."""
    model = tiny_model("qwen2", seed=6, dtype=torch.bfloat16)
    if graphs:
        use_graphs(model, capacity=64, capture=False)
    prompt = random_prompt(8, 9)
    cfg = GenerationConfig(max_new_tokens=12, method="hybrid", draft_quant="int8")
    run_tokens(model, prompt, cfg)
    assert model_state(model).learned  # costs, controller estimates, quantized layers
    gone = weakref.ref(model)
    del model
    gc.collect()
    assert gone() is None
