"""The public Python API: ``generate`` and ``stream``, shaped like ``transformers``' ``generate``."""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from .config import GenerationConfig
from .decoding import decode, make_drafter, start_session
from .runner import ModelRunner
from .stats import GenerationStats
from .text import IncrementalDecoder, Prompt, encode_prompt

_runners: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def runner_for(model) -> ModelRunner:
    """The (cached) runner of ``model``: on CUDA the graph runner (unless ``CLASP_CUDA_GRAPHS=0``), with
    ``CLASP_GRAPH_CAPACITY`` cache slots (default 4096); elsewhere the eager runner."""
    runner = _runners.get(model)
    if runner is None:
        on_cuda = next(model.parameters()).device.type == "cuda"
        if on_cuda and os.environ.get("CLASP_CUDA_GRAPHS", "1") != "0":
            runner = use_graphs(model, capacity=int(os.environ.get("CLASP_GRAPH_CAPACITY", "4096")))
        else:
            runner = _runners[model] = ModelRunner(model)
    return runner


def use_graphs(model, capacity: int = 4096, *, capture: bool | None = None, compile_layers: bool = False, **kwargs):
    """Run ``model`` through the static-shape graph runner from now on (``capture=False``: the same
    static code, eagerly; the CPU tests use it). Returns the runner."""
    from .graph_runner import GraphRunner

    runner = _runners[model] = GraphRunner(model, capacity, capture=capture, compile_layers=compile_layers, **kwargs)
    return runner


def eos_ids_of(model, tokenizer) -> frozenset[int]:
    """Every id that ends a generation: the generation config's, the model config's and the tokenizer's."""
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(int(v) for v in value)
    if tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    return frozenset(ids)


@dataclass
class GenerationResult:
    """``text`` is the decoded new text (cut before a stop string); ``token_ids`` the new tokens (through
    the one that completed a stop string, or the EOS token)."""

    text: str
    token_ids: list[int]
    prompt_token_ids: list[int]
    finish_reason: str  # "stop" (EOS or stop string) or "length"
    stats: GenerationStats = field(default_factory=GenerationStats)
    config: GenerationConfig | None = None


def _config(config: GenerationConfig | None, overrides: dict) -> GenerationConfig:
    base = config or GenerationConfig()
    return base.updated(**overrides) if overrides else base


def stream_tokens(
    model, tokenizer, prompt: Prompt, config: GenerationConfig | None = None, *, raw: bool = False, **overrides
) -> Iterator[tuple[str, list[int]]]:
    """Yield ``(text piece, new token ids)`` per round; the generator's return value is the result."""
    cfg = _config(config, overrides)
    runner = runner_for(model)
    prompt_ids = encode_prompt(tokenizer, prompt, raw=raw) if tokenizer is not None else list(prompt)
    session = start_session(runner, prompt_ids, cfg, eos_ids_of(model, tokenizer))
    text = IncrementalDecoder(tokenizer, cfg.stop) if tokenizer is not None else None
    finish = "length"
    for new in decode(runner, prompt_ids, cfg, session.eos_ids, make_drafter(cfg), session):
        piece = ""
        if text is not None:
            piece, cut = text.add(new)
            if cut is not None:
                drop = len(new) - cut - 1
                if drop:
                    del session.tokens[-drop:]
                    del new[cut + 1 :]
                yield piece, new
                finish = "stop"
                break
        if new and new[-1] in session.eos_ids:
            finish = "stop"
        yield piece, new
    if text is not None and not text.stopped:
        tail = text.flush()
        if tail:
            yield tail, []
    session.stats.new_tokens = session.generated
    return GenerationResult(
        text=text.text if text is not None else "",
        token_ids=session.tokens[session.prompt_len :],
        prompt_token_ids=prompt_ids,
        finish_reason=finish,
        stats=session.stats,
        config=cfg,
    )


def generate(
    model,
    tokenizer,
    prompt: Prompt,
    config: GenerationConfig | None = None,
    *,
    raw: bool = False,
    callback: Callable[[str], None] | None = None,
    **overrides,
) -> GenerationResult:
    """Generate a continuation of ``prompt`` with CLaSp (or ``method=...``); return text, ids and stats.

    ``prompt`` is a string (the chat template is applied when the tokenizer has one, unless ``raw``), a
    list of chat messages, or a list of token ids. Keyword options override ``config``'s fields, e.g.
    ``max_new_tokens=64, temperature=0.7, seed=1``. ``callback`` receives each text piece as it is made.
    """
    it = stream_tokens(model, tokenizer, prompt, config, raw=raw, **overrides)
    while True:
        try:
            piece, _ = next(it)
        except StopIteration as done:
            return done.value
        if callback is not None and piece:
            callback(piece)


def stream(
    model, tokenizer, prompt: Prompt, config: GenerationConfig | None = None, *, raw: bool = False, **overrides
) -> Iterator[str]:
    """An iterator of text pieces (whole UTF-8 characters) as they are generated."""
    for piece, _ in stream_tokens(model, tokenizer, prompt, config, raw=raw, **overrides):
        if piece:
            yield piece
