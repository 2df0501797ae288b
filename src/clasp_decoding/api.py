"""The public Python API: ``generate`` and ``stream``, shaped like ``transformers``' ``generate``."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from .batching import Batch, Member
from .config import GenerationConfig
from .context import model_state
from .decoding import Generation, GenerationResult
from .drafting.registry import make_drafter
from .errors import ConfigError
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
    model,
    tokenizer,
    prompt: Prompt,
    config: GenerationConfig | None = None,
    *,
    raw: bool = False,
    cache=None,
    reuse: int = 0,
    suffix_index=None,
    scope=None,
    **overrides,
) -> Generation:
    """A :class:`~.decoding.Generation` of ``prompt`` ready to run (validated, its cache allocated, or
    ``cache``: a ``(cache, release)`` pair from a batch's pool, already holding the prompt's first
    ``reuse`` tokens when a prefix was reused). ``suffix_index``: a :class:`~.suffix_index.SuffixIndex`
    kept between calls (a notebook's, a batch job's), which drafts from earlier requests (of ``scope``) and
    learns this one as it goes (its prompt at once, its output round by round).

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
        cache=cache,
        reuse=reuse,
        suffix=suffix_index,
        scope=scope,
    )


def is_batch(prompt) -> bool:
    """Whether ``prompt`` is several prompts: a list of strings, or of lists (token ids or chat messages);
    a list of messages (dicts) or of token ids (ints) is one prompt."""
    if isinstance(prompt, str) or not isinstance(prompt, (list, tuple)) or not prompt:
        return False
    return all(isinstance(p, str) for p in prompt) or all(isinstance(p, (list, tuple)) for p in prompt)


def generate(
    model,
    tokenizer,
    prompt: Prompt | Sequence[Prompt],
    config: GenerationConfig | None = None,
    *,
    raw: bool = False,
    callback: Callable[[str], None] | None = None,
    max_batch: int | None = None,
    **overrides,
) -> GenerationResult | list[GenerationResult]:
    """Generate a continuation of ``prompt`` with CLaSp (or ``method=...``); return text, ids and stats.
    ``callback`` receives each text piece as it is made. See :func:`generation` for the arguments.

    Several prompts (``[p1, p2, ...]``) run together on the batch scheduler (:mod:`.batching`), at most
    ``max_batch`` at once (default: all), and give a list of results in the same order; each is the result
    that prompt gets alone."""
    if is_batch(prompt):
        if callback is not None:
            raise ConfigError("callback= streams one prompt; with several, read each result's text.")
        return _generate_batch(model, tokenizer, list(prompt), config, raw, max_batch, overrides)
    gen = generation(model, tokenizer, prompt, config, raw=raw, **overrides)
    for chunk in gen:
        if callback is not None and chunk.text:
            callback(chunk.text)
    return gen.result()


def _generate_batch(model, tokenizer, prompts: list, config, raw: bool, max_batch, overrides) -> list:
    cfg = config or GenerationConfig()
    shared = {k: overrides.pop(k) for k in ("suffix_index", "scope") if k in overrides}
    if overrides:
        cfg = cfg.updated(**overrides)
    runner = model_state(model).runner
    encoded = [encode_prompt(tokenizer, p, raw=raw) if tokenizer is not None else list(p) for p in prompts]
    size = max(1, min(max_batch or len(encoded), len(encoded)))
    longest = max(len(ids) for ids in encoded)
    batch = Batch(runner, size * (longest + cfg.max_new_tokens + runner.scratch_slots()), size)
    waiting = list(enumerate(encoded))
    members: dict[int, Member] = {}
    errors: list[BaseException] = []
    while waiting or batch.members or batch.evicted:
        for m in list(batch.evicted):
            if not batch.readmit(m):
                break
        while waiting and not batch.full and not errors:
            i, ids = waiting[0]
            room = batch.cache_for(len(ids), cfg.max_new_tokens)
            if room is None:
                break
            waiting.pop(0)
            members[i] = Member(generation(model, tokenizer, ids, cfg, cache=room, **shared), on_error=errors.append)
            batch.join(members[i])
        if errors:
            for m in batch.members:
                m.generation.close()
            raise errors[0]
        batch.iterate()
    return [members[i].generation.result() for i in range(len(encoded))]


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
