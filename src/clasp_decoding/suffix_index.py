"""A suffix index over past prompts and outputs: drafts that learn from every request.

Real traffic repeats itself across requests (the same system prompt, the same kind of answer, code edited
again and again, an agent calling the same tools). The index keeps earlier sequences (each request's
prompt and output) and, given the current text, finds where its last few tokens occurred before and what
followed; the draft is the continuation most of those occurrences agree on, token by token (its
*support*: how many earlier occurrences back each token). Verification decides, so the index can change
speed only, never a token of output.

Everything is vectorised (torch): adding a sequence hashes all its n-grams at once, a lookup is a binary
search and a few small gathers, so no Python runs per token. Layout:

- ``corpus``: every kept sequence's tokens, one after another, each followed by a separator (-1);
- for each n-gram order ``n`` in :data:`ORDERS` and each position, the hash of the ``n`` tokens ending
  there, sorted (``keys``) with the position after them (``after``); recent additions wait in an unsorted
  tail, searched linearly, until it holds an eighth of the index (then one sort merges them), so adding
  never sorts the whole index per request;
- per position, the scope (whose history it is) and per sequence when it last served a draft.

A generation in progress is a *live* sequence (:meth:`begin`, :meth:`extend`, :meth:`end`): its prompt
is indexed when it starts, and its output round by round as tokens are accepted (one small vectorised
update per round, the n-grams the new tokens complete), so that requests running side by side learn
from each other's text at once. A live sequence reserves its longest possible length in the corpus
(unwritten slots are separators, where every draft stops); what its end leaves unused is reclaimed by
the next rebuild, which runs once such slack outgrows the text kept.

Bounded: at most ``max_tokens`` tokens; beyond, the sequences least recently used (by a draft, else by
age) are dropped, and the arrays rebuilt without them. About 90 bytes per token kept (the token, its scope, and per
indexed order a hash and a position). Scopes keep one user's text out of another's drafts (and so out of
their timing); a shared scope is an option (docs/server.md). :meth:`save` / :meth:`load` keep it across
restarts.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ORDERS = (8, 6, 4, 3, 2)
"""n-gram orders indexed, longest first: a lookup uses the longest one with a match."""
MAX_OCCURRENCES = 64
"""Most recent earlier occurrences of the context's suffix that vote on a draft."""
MATCH_SPAN = 64
"""How far back a match is measured (the controller bins lengths of 16 and more together)."""
SEPARATOR = -1
_MIX = (0x9E3779B97F4A7C15 - (1 << 64), 0xC2B2AE3D27D4EB4F - (1 << 64))  # odd 64-bit multipliers, as signed


def _hashes(tokens: torch.Tensor, order: int) -> torch.Tensor:
    """The hash of the ``order`` tokens ending at each position ``p >= order - 1`` of ``tokens`` (int64,
    wrapping arithmetic): ``[len - order + 1]``."""
    t = tokens.to(torch.int64)
    n = t.numel() - order + 1
    if n <= 0:
        return torch.empty(0, dtype=torch.int64)
    h = torch.full((n,), order * 0x100000001B3, dtype=torch.int64)
    for i in range(order):
        h = (h ^ (t[i : i + n] + 0x2545F491)) * _MIX[i % 2]
    return h


@dataclass
class _Sequence:
    start: int  # in the corpus
    length: int  # tokens written
    scope: int
    used: float = field(default_factory=time.monotonic)
    alive: bool = True
    capacity: int = 0  # corpus slots it owns, its separator excluded (at least ``length``)
    live: bool = False  # still growing (a generation in progress): never evicted


@dataclass
class SuffixDraft:
    """A draft from the index: ``tokens``, how many tokens of the context the best earlier occurrences
    matched (``match``: at least the n-gram order found, measured back up to :data:`MATCH_SPAN`), and
    how many of the voting occurrences backed each token (``support``)."""

    tokens: list[int]
    match: int
    support: list[int]


class SuffixIndex:
    """Earlier sequences, searchable by their suffixes; thread-safe (one lock around every operation).

    A draft: the longest n-gram order whose hash matches the context's end (checked against the tokens);
    of its most recent occurrences (in the caller's scope), those whose match reaches back at least half
    as far as the longest vote, token by token, for the continuation most of them share."""

    def __init__(self, max_tokens: int = 1 << 20, min_support: int = 1) -> None:
        self.max_tokens, self.min_support = max_tokens, min_support
        self._lock = threading.Lock()
        self.corpus = torch.empty(0, dtype=torch.int32)
        self.scopes = torch.empty(0, dtype=torch.int32)  # per corpus position
        self.keys = torch.empty(0, dtype=torch.int64)
        self.after = torch.empty(0, dtype=torch.int64)
        self.tail_keys = torch.empty(0, dtype=torch.int64)  # recent additions, unsorted, searched linearly
        self.tail_after = torch.empty(0, dtype=torch.int64)
        self.sequences: list[_Sequence] = []
        self._scope_ids: dict[object, int] = {}
        self.tokens_seen = 0
        self.slack = 0  # corpus slots no sequence uses any more (reclaimed by a rebuild)
        self._size = 0  # tokens written in the sequences kept
        self._starts: torch.Tensor | None = None  # the sequences' starts, for finding a position's owner
        self.lookups = 0
        self.hits = 0

    # ------------------------------------------------------------------ adding

    def scope_id(self, scope: object) -> int:
        return self._scope_ids.setdefault(scope, len(self._scope_ids))

    def add(self, tokens: list[int] | torch.Tensor, scope: object = None) -> None:
        """Keep ``tokens`` (a request's prompt and output) as one sequence of ``scope``'s history."""
        seq = torch.as_tensor(tokens, dtype=torch.int32).flatten()
        if seq.numel() < min(ORDERS) + 1:
            return
        with self._lock:
            self._append(seq, scope, seq.numel())
            self._settle()

    def begin(self, tokens: list[int], scope: object = None, reserve: int = 0) -> _Sequence:
        """Start a live sequence (a generation's prompt, ``tokens``), with room for ``reserve`` more tokens
        that :meth:`extend` adds as they are accepted; :meth:`end` closes it. The returned handle is
        opaque."""
        seq = torch.as_tensor(tokens, dtype=torch.int32).flatten()
        with self._lock:
            handle = self._append(seq, scope, seq.numel() + max(0, reserve))
            handle.live = True
            self._settle()
            return handle

    def extend(self, handle: _Sequence, tokens: list[int]) -> None:
        """A live sequence's text is now ``tokens`` (its earlier text followed by what was accepted since):
        index the new tokens and the n-grams they complete. Tokens beyond its reserve are not kept."""
        with self._lock:
            if not handle.alive or not handle.live:
                return
            end = min(len(tokens), handle.capacity)
            if end <= handle.length:
                return
            new = torch.tensor(tokens[handle.length : end], dtype=torch.int32)
            self.corpus[handle.start + handle.length : handle.start + end] = new
            back = max(ORDERS)  # the earlier tokens that new n-grams can start in
            lo = max(0, handle.length - back)
            window = self.corpus[handle.start + lo : handle.start + end]
            keys, after = self._entries(window, handle.start + lo, first=handle.length - lo)
            self.tail_keys = torch.cat([self.tail_keys, keys])
            self.tail_after = torch.cat([self.tail_after, after])
            self.tokens_seen += end - handle.length
            self._size += end - handle.length
            handle.length = end
            self._settle()

    def end(self, handle: _Sequence) -> None:
        """Close a live sequence: it is history now (evictable); its unused reserve becomes slack."""
        with self._lock:
            if not handle.live:
                return
            handle.live = False
            self.slack += handle.capacity - handle.length
            handle.capacity = handle.length
            if handle.alive and handle.length < min(ORDERS) + 1:
                handle.alive = False
                self.slack += handle.length
                self._size -= handle.length
            if self.slack > max(min(1 << 16, self.max_tokens), self._size):
                self._rebuild()

    def _append(self, seq: torch.Tensor, scope: object, capacity: int) -> _Sequence:
        """``seq`` as a new sequence at the corpus's end, owning ``capacity`` slots (unwritten ones hold
        separators), its n-grams in the tail."""
        sid = self.scope_id(scope)
        start = self.corpus.numel()
        room = torch.full((capacity + 1,), SEPARATOR, dtype=torch.int32)
        room[: seq.numel()] = seq
        self.corpus = torch.cat([self.corpus, room])
        self.scopes = torch.cat([self.scopes, torch.full((capacity + 1,), sid, dtype=torch.int32)])
        handle = _Sequence(start, seq.numel(), sid, capacity=capacity)
        self.sequences.append(handle)
        self._starts = None
        self.tokens_seen += seq.numel()
        self._size += seq.numel()
        keys, after = self._entries(seq, start)
        self.tail_keys = torch.cat([self.tail_keys, keys])
        self.tail_after = torch.cat([self.tail_after, after])
        return handle

    def _settle(self) -> None:
        """Merge a large tail; evict beyond the bound."""
        if self.tail_keys.numel() > max(1 << 16, self.keys.numel() // 8):
            self._merge()
        if self._size > self.max_tokens and any(s.alive and not s.live for s in self.sequences):
            self._evict()

    @staticmethod
    def _entries(seq: torch.Tensor, start: int, first: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Hashes and follow positions of the n-grams of ``seq`` (at corpus offset ``start``) that have a
        token after them, that token at index ``first`` of ``seq`` or later."""
        keys, after = [], []
        for order in ORDERS:
            h = _hashes(seq[:-1], order)  # n-grams ending before the last token: something follows each
            follow = torch.arange(order, order + h.numel(), dtype=torch.int64)
            keep = follow >= first
            keys.append(h[keep])
            after.append(follow[keep] + start)
        return torch.cat(keys), torch.cat(after)

    def _merge(self) -> None:
        """The recent additions into the sorted index (a stable sort keeps older entries first)."""
        if not self.tail_keys.numel():
            return
        keys = torch.cat([self.keys, self.tail_keys])
        after = torch.cat([self.after, self.tail_after])
        order = torch.argsort(keys, stable=True)
        self.keys, self.after = keys[order], after[order]
        self.tail_keys = torch.empty(0, dtype=torch.int64)
        self.tail_after = torch.empty(0, dtype=torch.int64)

    @property
    def size(self) -> int:
        """Tokens kept."""
        return self._size

    def nbytes(self) -> int:
        """Memory held by the index's arrays."""
        arrays = (self.corpus, self.scopes, self.keys, self.after, self.tail_keys, self.tail_after)
        return sum(a.numel() * a.element_size() for a in arrays)

    def _evict(self) -> None:
        """Drop least recently used sequences until within ``max_tokens`` (keeping at least 3/4 of it), then
        rebuild the arrays without them."""
        alive = sorted((s for s in self.sequences if s.alive and not s.live), key=lambda s: s.used)
        total = self._size  # live sequences count, but stay
        for s in alive:
            if total <= self.max_tokens * 3 // 4:
                break
            s.alive = False
            total -= s.length
        self._rebuild()

    def _rebuild(self) -> None:
        """The arrays again from the sequences kept (live ones with their reserve, in place: their handles
        stay valid), without the evicted ones and the slack."""
        kept = [s for s in self.sequences if s.alive]
        parts, scopes, keys, after, at = [], [], [], [], 0
        for s in kept:
            room = self.corpus[s.start : s.start + s.capacity + 1].clone()
            parts.append(room)
            scopes.append(torch.full((s.capacity + 1,), s.scope, dtype=torch.int32))
            k, a = self._entries(room[: s.length], at)
            keys.append(k)
            after.append(a)
            s.start = at
            at += s.capacity + 1
        self.corpus = torch.cat(parts) if parts else torch.empty(0, dtype=torch.int32)
        self.scopes = torch.cat(scopes) if scopes else torch.empty(0, dtype=torch.int32)
        self.keys = torch.cat(keys) if keys else torch.empty(0, dtype=torch.int64)
        self.after = torch.cat(after) if after else torch.empty(0, dtype=torch.int64)
        self.tail_keys = torch.empty(0, dtype=torch.int64)
        self.tail_after = torch.empty(0, dtype=torch.int64)
        order = torch.argsort(self.keys, stable=True)
        self.keys, self.after = self.keys[order], self.after[order]
        self.sequences = kept
        self._starts = None
        self._size = sum(s.length for s in kept)
        self.slack = 0

    # ------------------------------------------------------------------ drafting

    def draft(self, context: list[int], max_tokens: int, scope: object = None) -> SuffixDraft | None:
        """The continuation of ``context``'s last tokens that most earlier occurrences (of ``scope``'s
        history) agree on, token by token while at least ``min_support`` of them do, at most
        ``max_tokens``; ``None`` without a match."""
        if max_tokens <= 0 or len(context) < min(ORDERS):
            return None
        with self._lock:
            self.lookups += 1
            sid = self._scope_ids.get(scope)
            if sid is None or not self.sequences:
                return None
            tail = torch.tensor(context[-max(ORDERS) :], dtype=torch.int32)
            for order in ORDERS:
                if tail.numel() < order:
                    continue
                h = _hashes(tail[-order:], order)
                lo = int(torch.searchsorted(self.keys, h, right=False))
                hi = int(torch.searchsorted(self.keys, h, right=True))
                recent = self.tail_after[self.tail_keys == h]
                if hi <= lo and recent.numel() == 0:
                    continue
                pos = torch.cat([self.after[max(lo, hi - 4 * MAX_OCCURRENCES) : hi], recent[-4 * MAX_OCCURRENCES :]])
                pos = pos[self.scopes[pos] == sid]
                pos = pos[self._really_follows(pos, tail[-order:])]
                if pos.numel() == 0:
                    continue
                pos = pos.sort().values[-MAX_OCCURRENCES:]  # the most recent occurrences
                # How far back each occurrence matches the context: the longest ones predict best, and
                # the length tells the controller how far such a copy tends to go on.
                back = self._match_lengths(pos, context)
                longest = int(back.max())
                pos = pos[back * 2 >= longest]
                found = self._vote(pos, max_tokens)
                if found is not None:
                    self.hits += 1
                    self._touch(pos)
                    return SuffixDraft(found[0], longest, found[1])
            return None

    def _match_lengths(self, pos: torch.Tensor, context: list[int]) -> torch.Tensor:
        """For each occurrence (the position after it), how many tokens before it equal the context's
        last ones, up to :data:`MATCH_SPAN` (a separator ends a match)."""
        span = min(MATCH_SPAN, len(context))
        ctx = torch.tensor(context[-span:][::-1], dtype=torch.int32)  # the context backwards
        idx = pos[:, None] - 1 - torch.arange(span)[None, :]
        same = (self.corpus[idx.clamp_min(0)] == ctx[None, :]) & (idx >= 0)
        return same.to(torch.int64).cumprod(1).sum(1)

    def _really_follows(self, pos: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
        """Which positions truly follow ``gram`` (a hash match could, rarely, be a collision)."""
        n = gram.numel()
        idx = pos[:, None] - n + torch.arange(n)[None, :]
        return (self.corpus[idx.clamp_min(0)] == gram[None, :]).all(1) & (pos >= n)

    def _vote(self, pos: torch.Tensor, max_tokens: int) -> tuple[list[int], list[int]] | None:
        """Follow the occurrences token by token: each step, the token most of those still agreeing have
        next (while ``min_support`` of them have it); stop at a separator."""
        span = torch.arange(max_tokens)[None, :]
        idx = (pos[:, None] + span).clamp_max(self.corpus.numel() - 1)
        cont = self.corpus[idx].to(torch.int64)  # [occurrences, max_tokens]
        alive = torch.ones(cont.shape[0], dtype=torch.bool)
        tokens, support = [], []
        for i in range(max_tokens):
            column = cont[alive, i]
            if column.numel() < self.min_support:
                break
            values, counts = torch.unique(column, return_counts=True)
            best = int(torch.argmax(counts))
            token, count = int(values[best]), int(counts[best])
            if token == SEPARATOR or count < self.min_support:
                break
            tokens.append(token)
            support.append(count)
            alive &= cont[:, i] == token
        return (tokens, support) if tokens else None

    def _touch(self, pos: torch.Tensor) -> None:
        if self._starts is None:
            self._starts = torch.tensor([s.start for s in self.sequences], dtype=torch.int64)
        starts = self._starts
        now = time.monotonic()
        for i in torch.unique(torch.searchsorted(starts, pos, right=True) - 1).tolist():
            if 0 <= i < len(self.sequences):
                self.sequences[i].used = now

    # ------------------------------------------------------------------ keeping it

    def save(self, path: str | Path) -> None:
        """Write the kept sequences (and their scopes) to ``path``; :meth:`load` rebuilds the index."""
        with self._lock:
            seqs = [s for s in self.sequences if s.alive]
            names = {v: k for k, v in self._scope_ids.items()}
            data = {
                "tokens": [self.corpus[s.start : s.start + s.length].clone() for s in seqs],
                "scopes": [repr(names.get(s.scope)) for s in seqs],
                "max_tokens": self.max_tokens,
            }
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        torch.save(data, tmp)
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path, max_tokens: int | None = None) -> SuffixIndex:
        """An index holding what :meth:`save` wrote (scopes come back as their ``repr`` strings' values for
        ``None`` and strings; other scopes as those strings)."""
        data = torch.load(Path(path), weights_only=True)
        index = cls(max_tokens or data.get("max_tokens", 1 << 20))
        for tokens, scope in zip(data["tokens"], data["scopes"], strict=True):
            index.add(tokens, _scope_from(scope))
        return index


def _scope_from(text: str):
    """A saved scope back: ``None``, a string, or a tuple of strings and ints (what the server uses)."""
    import ast

    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
