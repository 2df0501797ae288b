"""The public Python API: ``generate`` and ``stream``, shaped like ``transformers``' ``generate``."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from .config import GenerationConfig
from .context import model_state
from .decoding import Generation, GenerationResult
from .drafting.registry import make_drafter
from .text import IncrementalDecoder, Prompt, encode_prompt

__all__ = ["GenerationResult", "eos_ids_of", "generate", "generation", "stream"]


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


def generation(
    model, tokenizer, prompt: Prompt, config: GenerationConfig | None = None, *, raw: bool = False, **overrides
) -> Generation:
    """A :class:`~.decoding.Generation` of ``prompt`` ready to run (validated, its cache allocated).

    ``prompt`` is a string (the chat template is applied when the tokenizer has one, unless ``raw``), a
    list of chat messages, or a list of token ids (the only form without a tokenizer). Keyword options
    override ``config``'s fields, e.g. ``max_new_tokens=64, temperature=0.7, seed=1``.
    """
    cfg = config or GenerationConfig()
    if overrides:
        cfg = cfg.updated(**overrides)
    state = model_state(model)
    prompt_ids = encode_prompt(tokenizer, prompt, raw=raw) if tokenizer is not None else list(prompt)
    return Generation(
        state.runner,
        prompt_ids,
        cfg,
        make_drafter(cfg),
        model=state,
        eos_ids=eos_ids_of(model, tokenizer),
        detokenizer=IncrementalDecoder(tokenizer, cfg.stop) if tokenizer is not None else None,
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
    ``callback`` receives each text piece as it is made. See :func:`generation` for the arguments."""
    gen = generation(model, tokenizer, prompt, config, raw=raw, **overrides)
    for chunk in gen:
        if callback is not None and chunk.text:
            callback(chunk.text)
    return gen.result()


def stream(
    model, tokenizer, prompt: Prompt, config: GenerationConfig | None = None, *, raw: bool = False, **overrides
) -> Iterator[str]:
    """An iterator of text pieces (whole UTF-8 characters) as they are generated."""
    gen = generation(model, tokenizer, prompt, config, raw=raw, **overrides)
    try:
        for chunk in gen:
            if chunk.text:
                yield chunk.text
    finally:
        gen.close()
