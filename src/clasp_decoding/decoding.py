"""The draft / verify / accept loop, shared by every drafting strategy.

One round, with ``n`` verified tokens in the cache and the last token ``x`` not yet in it::

    draft  = drafter.propose(session, k_max)             # d_1..d_k (may write scratch K/V at n..)
    logits = runner.forward([x, d_1..d_k], start=n)      # all layers; overwrites slots n..n+k
    a, t   = accept(draft, logits)                       # a drafts agree; t is the target's next token
    cache.length = n + a + 1                             # rollback: move the valid length, copy nothing
    emit d_1..d_a, t                                     # cut at EOS / max_new_tokens

Greedy acceptance keeps the output identical to plain greedy decoding; speculative sampling keeps it
distributed exactly as plain sampling. Every few rounds the drafter re-selects its skip set from the
hidden states this verification returned.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import torch

from .config import GenerationConfig
from .drafters import Draft, Drafter, LayerSkipDrafter, NoDraft, PromptLookupDrafter
from .errors import ConfigError, InputError
from .runner import ModelRunner
from .sampling import greedy_accept, pick, speculative_accept, warp
from .session import Session


def make_drafter(config: GenerationConfig) -> Drafter:
    """The drafting strategy named by ``config.method``."""
    if config.method == "ar":
        return NoDraft()
    if config.method == "clasp":
        if config.adaptive:
            from .hybrid import HybridDrafter

            return HybridDrafter(use_lookup=False)
        return LayerSkipDrafter(dynamic=True)
    if config.method == "static":
        return LayerSkipDrafter(dynamic=False)
    if config.method == "pld":
        return PromptLookupDrafter()
    if config.method == "hybrid":
        from .hybrid import HybridDrafter

        return HybridDrafter()
    raise ConfigError(f"Unknown method {config.method!r}.")


def check_prompt(runner: ModelRunner, prompt_len: int, max_new_tokens: int) -> None:
    """Refuse an empty prompt or one that, with ``max_new_tokens``, does not fit the model's context."""
    if prompt_len == 0:
        raise InputError("The prompt is empty: give at least one token.")
    limit = runner.max_positions
    if prompt_len >= limit:
        raise InputError(f"The prompt has {prompt_len} tokens, but the model's context holds {limit}.")
    if prompt_len + max_new_tokens > limit:
        raise InputError(
            f"The prompt ({prompt_len} tokens) plus max_new_tokens ({max_new_tokens}) exceeds the model's "
            f"context of {limit} tokens; ask for at most {limit - prompt_len} new tokens."
        )


def start_session(
    runner: ModelRunner, prompt_ids: list[int], config: GenerationConfig, eos_ids: set[int] | frozenset[int]
) -> Session:
    """Validate, allocate the cache (prompt + new tokens + scratch for the DP), seed the sampler."""
    config.validate(runner.num_layers)
    check_prompt(runner, len(prompt_ids), config.max_new_tokens)
    bad = [t for t in prompt_ids if not 0 <= t < runner.vocab_size]
    if bad:
        raise InputError(f"Prompt token ids {bad[:5]} are outside the vocabulary (0..{runner.vocab_size - 1}).")
    capacity = len(prompt_ids) + config.max_new_tokens + runner.num_layers + 2
    generator = None
    if not config.sampling.greedy:
        generator = torch.Generator(device=runner.device)
        generator.manual_seed(config.seed if config.seed is not None else int(torch.randint(2**62, ()).item()))
    return Session(
        runner=runner,
        cache=runner.new_cache(capacity),
        config=config,
        eos_ids=frozenset(eos_ids),
        tokens=list(prompt_ids),
        prompt_len=len(prompt_ids),
        generator=generator,
    )


def decode(
    runner: ModelRunner,
    prompt_ids: list[int],
    config: GenerationConfig,
    eos_ids: set[int] | frozenset[int] = frozenset(),
    drafter: Drafter | None = None,
    session: Session | None = None,
) -> Iterator[list[int]]:
    """Generate, yielding the new tokens of each round. Stops after an EOS token (which is yielded) or at
    ``max_new_tokens``; a caller that wants to stop earlier (stop strings) simply stops iterating.
    Statistics accumulate in ``session.stats`` (pass a session from :func:`start_session` to read them).
    """
    s = session or start_session(runner, prompt_ids, config, eos_ids)
    drafter = drafter or make_drafter(config)
    stats = s.stats
    stats.prompt_tokens = s.prompt_len
    exact_limit = getattr(getattr(runner, "numerics", None), "max_verify_drafts", None)
    t_start = time.perf_counter()
    try:
        # Prefill: every prompt token through every layer; the first new token comes from its last row.
        prompt = torch.tensor(s.tokens, device=runner.device)
        want = drafter.wants_prefill_hidden()
        logits, hidden = runner.forward(s.cache, prompt, 0, last_only=True, collect_hidden=want)
        s.cache.rollback(s.prompt_len)
        first = int(pick(logits, s.params, s.generator)[0])
        stats.time_prefill = time.perf_counter() - t_start
        stats.steps = 1
        s.tokens.append(first)
        drafter.start(s, hidden[:, -1] if hidden is not None else None)
        if not _emit(s, [first]):
            yield [first]
            return
        yield [first]
        while True:
            budget = config.max_new_tokens - s.generated
            t0 = time.perf_counter()
            room = budget - 1 if exact_limit is None else min(budget - 1, exact_limit)
            draft = drafter.propose(s, room) if room > 0 else Draft([], None, "plain")
            s.draft_seconds = time.perf_counter() - t0
            stats.time_draft += s.draft_seconds
            tokens = _verify(s, drafter, draft)
            s.round += 1
            if not _emit(s, tokens):
                yield tokens
                return
            yield tokens
    finally:
        stats.time_total = time.perf_counter() - t_start
        stats.new_tokens = s.generated


def _verify(s: Session, drafter: Drafter, draft: Draft) -> list[int]:
    """One full-model forward over ``[last, drafts]``; accept, roll back, let the drafter observe."""
    runner, cache, params = s.runner, s.cache, s.params
    n = cache.length
    k = len(draft)
    inputs = torch.tensor([s.last_token, *draft.tokens], device=runner.device)
    want = drafter.wants_hidden(s)
    t0 = time.perf_counter()
    logits, hidden = runner.forward(cache, inputs, n, collect_hidden=want)
    drafted = inputs[1:]
    if params.greedy:
        a, nxt = greedy_accept(drafted, logits)
    else:
        a, nxt = speculative_accept(drafted, draft.probs, warp(logits, params), s.generator)
    s.verify_seconds = time.perf_counter() - t0  # the acceptance's host sync makes this the real time
    s.stats.time_verify += s.verify_seconds
    cache.rollback(n + a + 1)
    s.stats.steps += 1
    s.stats.drafted += k
    s.stats.accepted += a
    s.stats.accepted_lengths.append(a)
    s.stats.draft_lengths.append(k)
    s.stats.modes.append(draft.source)
    new = [*draft.tokens[:a], nxt]
    s.tokens.extend(new)
    drafter.observe(s, draft, a, hidden)
    return new


def _emit(s: Session, new: list[int]) -> bool:
    """Cut ``new`` (already appended to ``s.tokens``) at the first EOS or the token limit, in place.
    Returns whether generation goes on."""
    cut = len(new)
    for i, t in enumerate(new):
        if t in s.eos_ids:
            cut = i + 1
            break
    over = s.generated - s.config.max_new_tokens
    cut = min(cut, len(new) - max(0, over))
    if cut < len(new):
        del s.tokens[len(s.tokens) - (len(new) - cut) :]
        del new[cut:]
    return not (new and new[-1] in s.eos_ids) and s.generated < s.config.max_new_tokens
