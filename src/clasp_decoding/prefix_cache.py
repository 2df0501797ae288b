"""Prefix reuse: the caches of finished requests, kept so that a later prompt starting with the same tokens
(the next turn of a chat, a shared system prompt) fills only the rest.

Exact, not approximate: a prompt's cache has the same bits however it was computed (prefilled at once,
in chunks, or decoded token by token: every row is attended and projected on its own), so a reused
prefix is the very cache a full prefill would write (:mod:`.numerics`; tested). Only models whose
numerics promise that (``NumericsReport.prompt_rowwise``) get a prefix cache.

Bounded by the cache pool: entries hold pool blocks, and the scheduler takes them back, least recently
used first, before it would preempt a running request. Entries are kept per *scope* (by default the API
key that made them), so that one user's text never shapes what another user is served, not even its
speed; a server may share them across keys instead (docs/server.md).
"""

from __future__ import annotations

import collections
import itertools
from array import array
from dataclasses import dataclass, field

from .kv_cache import KVPool, PoolCache

MIN_REUSE = 16
"""Prefixes shorter than this are not worth a lookup or a copy."""


def _as_bytes(tokens: list[int]) -> bytes:
    return array("q", tokens).tobytes()


def common_prefix(a: bytes, b: bytes) -> int:
    """Tokens two token strings (as :func:`_as_bytes`) share at their start: a binary search over prefix
    comparisons, each done in C."""
    lo, hi = 0, min(len(a), len(b)) // 8
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[: 8 * mid] == b[: 8 * mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


@dataclass
class Entry:
    scope: object
    tokens: list[int]
    key: bytes
    cache: PoolCache
    hits: int = 0
    id: int = field(default=0)


class PrefixCache:
    """Finished requests' caches by their tokens, least recently used first out."""

    def __init__(self, pool: KVPool, max_entries: int = 64, enabled: bool = True) -> None:
        self.pool, self.max_entries, self.enabled = pool, max_entries, enabled
        self.entries: collections.OrderedDict[int, Entry] = collections.OrderedDict()
        self._ids = itertools.count(1)
        self.hits = 0
        self.reused_tokens = 0

    @property
    def slots(self) -> int:
        """Pool slots the kept prefixes hold."""
        return sum(e.cache.capacity for e in self.entries.values())

    def lookup(self, scope, prompt: list[int]) -> tuple[Entry, int] | None:
        """The kept prefix of ``scope`` that shares the most tokens with ``prompt`` (at least
        :data:`MIN_REUSE`, and fewer than the whole prompt: its last token must still be run), with how
        many tokens it shares."""
        if not self.enabled or not self.entries:
            return None
        key = _as_bytes(prompt)
        best, length = None, 0
        for e in self.entries.values():
            if e.scope == scope:
                n = min(common_prefix(key, e.key), len(prompt) - 1, e.cache.length)
                if n > length:
                    best, length = e, n
        if best is None or length < MIN_REUSE:
            return None
        self.entries.move_to_end(best.id)
        best.hits += 1
        self.hits += 1
        self.reused_tokens += length
        return best, length

    def add(self, scope, tokens: list[int], cache: PoolCache) -> bool:
        """Keep ``cache`` (holding ``tokens``) for later; it now belongs to this store. An entry whose
        tokens the new one extends is dropped (the new one serves every prompt it served). Returns whether
        it was kept (a cache too short to reuse is given back at once)."""
        if not self.enabled or len(tokens) < MIN_REUSE:
            self.pool.release(cache)
            return False
        key = _as_bytes(tokens)
        for e in list(self.entries.values()):
            if e.scope == scope and common_prefix(key, e.key) >= len(e.tokens):
                self._drop(e)
        cache.shrink(len(tokens))
        entry = Entry(scope, list(tokens), key, cache, id=next(self._ids))
        self.entries[entry.id] = entry
        while len(self.entries) > self.max_entries:
            self._drop(next(iter(self.entries.values())))
        return True

    def free(self, slots: int) -> bool:
        """Give back least recently used entries until at least ``slots`` pool slots were freed (or none
        is left); whether any was."""
        freed = 0
        while self.entries and freed < slots:
            e = next(iter(self.entries.values()))
            freed += e.cache.capacity
            self._drop(e)
        return freed > 0

    def clear(self) -> None:
        for e in list(self.entries.values()):
            self._drop(e)

    def _drop(self, e: Entry) -> None:
        self.entries.pop(e.id, None)
        self.pool.release(e.cache)
