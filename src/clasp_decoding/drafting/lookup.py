"""Prompt lookup: drafts copied from what followed an earlier occurrence of the context's last tokens."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import Draft, Drafter, Source

if TYPE_CHECKING:
    from ..state import DecodeState

MATCH_SPAN = 64
"""How far back a lookup match is measured (the controller bins lengths of 16 and more together)."""


class NgramIndex:
    """The latest position after each n-gram of a growing token list, for ``min_n <= n <= max_n``.

    It grows by at most ``max_n - min_n + 1`` dict inserts per token, so its memory is linear in the
    context (``GenerationConfig`` bounds ``max_n``)."""

    def __init__(self, min_n: int, max_n: int) -> None:
        self.min_n, self.max_n = min_n, max_n
        self.follow: dict[tuple[int, ...], int] = {}
        self.indexed = 0  # n-grams ending before this position are in the index

    def extend(self, tokens: list[int]) -> None:
        """Index every n-gram that ends before the last token (so a lookup never finds the suffix itself)."""
        for end in range(self.indexed, len(tokens) - 1):
            for n in range(self.min_n, min(self.max_n, end + 1) + 1):
                self.follow[tuple(tokens[end + 1 - n : end + 1])] = end + 1
        self.indexed = max(self.indexed, len(tokens) - 1)

    def lookup(self, tokens: list[int], max_tokens: int) -> tuple[list[int], int]:
        """The continuation of the longest earlier match of the context's suffix, and how long that match
        really is (counted backwards past ``max_n``, up to :data:`MATCH_SPAN`); ``([], 0)`` if none."""
        self.extend(tokens)
        for n in range(min(self.max_n, len(tokens)), self.min_n - 1, -1):
            follow = self.follow.get(tuple(tokens[-n:]))
            if follow is not None:
                length, last = n, len(tokens) - 1
                while (
                    length < MATCH_SPAN
                    and follow - 1 - length >= 0
                    and tokens[follow - 1 - length] == tokens[last - length]
                ):
                    length += 1
                return tokens[follow : follow + max_tokens], length
        return [], 0

    def peek(self, tokens: list[int], draft: list[int], max_tokens: int) -> list[int]:
        """What followed the latest earlier occurrence of the end of ``tokens + draft`` (the context with
        a draft not yet verified after it), without indexing the draft; ``[]`` if nothing."""
        self.extend(tokens)
        ctx = tokens[-self.max_n :] + draft
        for n in range(min(self.max_n, len(ctx)), self.min_n - 1, -1):
            follow = self.follow.get(tuple(ctx[-n:]))
            if follow is not None:
                found = tokens[follow : follow + max_tokens]
                return found + draft[: max_tokens - len(found)]
        return []


class PromptLookupDrafter(Drafter):
    """Prompt lookup (longest n-gram first, latest occurrence), at most ``lookup_max_tokens`` per draft."""

    def __init__(self) -> None:
        self.index = NgramIndex(1, 1)
        self.max_tokens = 0

    def start(self, state: DecodeState, prompt_hidden) -> None:
        cfg = state.config
        self.index = NgramIndex(cfg.lookup_min_ngram, cfg.lookup_max_ngram)
        self.max_tokens = cfg.lookup_max_tokens
        self.index.extend(state.tokens)

    def propose(self, state: DecodeState, max_tokens: int) -> Draft:
        found, _ = self.index.lookup(state.tokens, min(max_tokens, self.max_tokens))
        return Draft(found, Source.LOOKUP) if found else Draft([])


class SuffixDrafter(Drafter):
    """Drafts from the shared suffix index (:mod:`..suffix_index`): the continuation that most earlier
    occurrences of the context's last tokens agree on, at most ``lookup_max_tokens``; nothing without an
    index or a match."""

    def propose(self, state: DecodeState, max_tokens: int) -> Draft:
        if state.suffix is None:
            return Draft([])
        found = state.suffix.draft(state.tokens, min(max_tokens, state.config.lookup_max_tokens), state.scope)
        return Draft(found.tokens, Source.SUFFIX) if found is not None else Draft([])
