"""Plain decoding as users know it: ``transformers``' own ``generate``, configured to match our config.

Every sampling setting is passed explicitly, so a checkpoint's ``generation_config.json`` (which may
carry its own temperature, top-k or repetition penalty) cannot make the reference decode differently.
"""

from __future__ import annotations

import copy
import time

import torch

from . import numerics
from .config import GenerationConfig


def pristine_copy(model):
    """A copy of ``model`` as loaded, without the project's numerics (taken off the copy if ``model`` has
    them): the ``generate`` users have, for baselines and fidelity figures. Its own memory."""
    clone = copy.deepcopy(model)
    numerics.restore(clone)
    return clone


def hf_generation_config(config: GenerationConfig, eos_ids, pad_id: int | None):
    """A ``transformers.GenerationConfig`` equivalent to ``config``."""
    from transformers import GenerationConfig as HFConfig

    eos = sorted(eos_ids) or None
    sampling = config.temperature > 0
    return HFConfig(
        max_new_tokens=config.max_new_tokens,
        min_new_tokens=config.min_new_tokens or None,
        do_sample=sampling,
        temperature=config.temperature if sampling else None,
        top_k=config.top_k if sampling and config.top_k else None,
        top_p=config.top_p if sampling and config.top_p < 1 else None,
        repetition_penalty=None,
        eos_token_id=eos,
        pad_token_id=pad_id if pad_id is not None else (eos[0] if eos else 0),
        stop_strings=list(config.stop) or None,
    )


@torch.inference_mode()
def hf_generate(
    model, tokenizer, prompt_ids: list[int], config: GenerationConfig, eos_ids, **hf_kwargs
) -> tuple[list[int], float]:
    """Run ``model.generate`` on ``prompt_ids``; return the new token ids and the wall time in seconds.

    Its fastest configuration per device: on CUDA a static cache (which ``transformers`` compiles); on
    the CPU the default dynamic cache (a static cache measured slower there: docs/results.md)."""
    gen = hf_generation_config(config, eos_ids, getattr(tokenizer, "pad_token_id", None))
    if model.device.type == "cuda":
        gen.cache_implementation = "static"
    for key, value in hf_kwargs.items():
        setattr(gen, key, value)
    inputs = torch.tensor([prompt_ids], device=model.device)
    if config.seed is not None:
        torch.manual_seed(config.seed)
    extra = {"tokenizer": tokenizer} if config.stop else {}
    t0 = time.perf_counter()
    out = model.generate(inputs, attention_mask=torch.ones_like(inputs), generation_config=gen, **extra)
    seconds = time.perf_counter() - t0
    new = out[0, len(prompt_ids) :].tolist()
    return new, seconds
