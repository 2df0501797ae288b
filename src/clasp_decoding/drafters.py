"""Drafting strategies behind one small interface; the decoding loop never knows which one it runs.

- :class:`NoDraft`: nothing is drafted, so every round is one plain decoding step.
- :class:`LayerSkipDrafter`: the model itself with a skip set of layers, CLaSp's draft. Its skip set is
  either re-chosen by the dynamic program every ``layer_opt_interval`` rounds (``dynamic=True``, CLaSp)
  or fixed (``dynamic=False``: a given set, or every other middle layer).
- :class:`PromptLookupDrafter`: continuations copied from earlier n-gram matches in the context.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .layer_select import clasp_dp, every_other_middle
from .runner import VocabSubset
from .sampling import sample, warp
from .session import Session


@dataclass
class Draft:
    """Proposed tokens. ``probs`` holds the draft's warped distributions ``[k, V]`` when the draft
    sampled them from a model; ``None`` means a deterministic draft (one-hot ``q``)."""

    tokens: list[int]
    probs: torch.Tensor | None = None
    source: str = "none"

    def __len__(self) -> int:
        return len(self.tokens)


class Drafter:
    """The interface. ``propose`` may run the model (writing scratch cache slots beyond the verified ones);
    ``observe`` sees each round's outcome after the cache was rolled back to the verified tokens."""

    name = "none"

    def start(self, session: Session, prompt_hidden: torch.Tensor | None) -> None:
        """Called once after the prefill, with the last prompt token's hidden states ``[L + 1, d]`` if
        :meth:`wants_prefill_hidden`."""

    def wants_prefill_hidden(self) -> bool:
        return False

    def wants_hidden(self, session: Session) -> bool:
        """Whether the coming verification should return all layers' hidden states."""
        return False

    def propose(self, session: Session, max_tokens: int) -> Draft:
        raise NotImplementedError

    def observe(self, session: Session, draft: Draft, accepted: int, hidden: torch.Tensor | None) -> None:
        """``hidden`` (when asked for) is ``[L + 1, k + 1, d]`` from the verification."""


class NoDraft(Drafter):
    """Plain autoregressive decoding through the same loop."""

    name = "ar"

    def propose(self, session: Session, max_tokens: int) -> Draft:
        return Draft([], None, "plain")


class LayerSkipDrafter(Drafter):
    """Draft with the model's own layers minus a skip set; stop at the draft-exiting threshold."""

    def __init__(self, dynamic: bool = True) -> None:
        self.dynamic = dynamic
        self.name = "clasp" if dynamic else "static"
        self.skip: tuple[int, ...] = ()
        self.keep: tuple[int, ...] = ()
        self.vocab: VocabSubset | None = None

    def wants_prefill_hidden(self) -> bool:
        return self.dynamic

    def configure(self, session: Session, num_skip: int | None = None) -> None:
        """Skip count and draft head for this generation; a fixed skip set if the config gives one."""
        cfg = session.config
        self.num_skip = num_skip if num_skip is not None else cfg.num_skipped(session.runner.num_layers)
        if cfg.draft_vocab and cfg.draft_vocab < session.runner.vocab_size:
            self.vocab = VocabSubset(session.runner.head, cfg.draft_vocab, session.tokens)
        if cfg.skip_layers is not None:
            self.use(session, tuple(sorted(set(cfg.skip_layers))))
            self.dynamic = False

    def start(self, session: Session, prompt_hidden: torch.Tensor | None, num_skip: int | None = None) -> None:
        self.configure(session, num_skip)
        if session.config.skip_layers is not None:
            return
        if self.dynamic and prompt_hidden is not None:
            self.select(session, prompt_hidden, session.prompt_len - 1)
        else:
            self.use(session, every_other_middle(session.runner.num_layers, self.num_skip))

    def use(self, session: Session, skip: tuple[int, ...]) -> None:
        self.skip = skip
        dropped = set(skip)
        self.keep = tuple(i for i in session.runner.all_layers if i not in dropped)
        session.stats.skip_sets.append((session.stats.steps, skip))

    def select(self, session: Session, hidden: torch.Tensor, position: int) -> None:
        """Run CLaSp's DP on the hidden states of the token at ``position`` (already verified)."""
        t0 = time.perf_counter()
        runner, cache = session.runner, session.cache
        skip = clasp_dp(hidden, self.num_skip, lambda i, s: runner.layer_candidates(cache, i - 1, s, position))
        session.stats.time_select += time.perf_counter() - t0
        session.stats.layer_selections += 1
        self.use(session, skip)

    def wants_hidden(self, session: Session) -> bool:
        return self.dynamic and (session.round + 1) % session.config.layer_opt_interval == 0

    def propose(self, session: Session, max_tokens: int) -> Draft:
        runner, cache, params = session.runner, session.cache, session.params
        threshold = session.config.draft_exit_threshold
        max_tokens = min(max_tokens, session.config.max_draft_tokens)
        token = torch.tensor([session.last_token], device=runner.device)
        position = session.position
        tokens: list[int] = []
        dists: list[torch.Tensor] = []
        for _ in range(max_tokens):
            logits, _ = runner.forward(cache, token, position, layers=self.keep, last_only=True, vocab=self.vocab)
            if params.greedy:
                conf, nxt = torch.softmax(logits[0], -1).max(0)
            else:
                q = warp(logits[0], params)
                nxt = sample(q[None], session.generator)[0]
                conf = q.max()
                dists.append(q if self.vocab is None else self.vocab.to_full(q))
            if self.vocab is not None:
                nxt = self.vocab.ids[nxt]
            tok, c = torch.stack([nxt.double(), conf.double()]).tolist()  # the draft's one sync per step
            tokens.append(int(tok))
            position += 1
            if c < threshold or int(tok) in session.eos_ids:
                break
            token = nxt.view(1)
        return Draft(tokens, torch.stack(dists) if dists else None, self.name)

    def observe(self, session: Session, draft: Draft, accepted: int, hidden: torch.Tensor | None) -> None:
        if self.dynamic and hidden is not None:
            # The last verified input of this round sits at row ``accepted`` of the verification.
            self.select(session, hidden[:, accepted], session.position - 1)


MATCH_SPAN = 64
"""How far back a lookup match is measured (the controller bins lengths of 16 and more together)."""


class PromptLookupDrafter(Drafter):
    """Prompt lookup: find the latest earlier occurrence of the context's last n tokens (longest n first)
    and propose the tokens that followed it. The n-gram index grows by a few dict inserts per token."""

    name = "pld"

    def __init__(self, min_ngram: int = 2, max_ngram: int = 4, max_tokens: int = 10) -> None:
        self.min_ngram, self.max_ngram, self.max_tokens = min_ngram, max_ngram, max_tokens
        self.index: dict[tuple[int, ...], int] = {}
        self.indexed = 0  # n-grams ending before this position are in the index

    def start(self, session: Session, prompt_hidden: torch.Tensor | None) -> None:
        cfg = session.config
        self.min_ngram, self.max_ngram, self.max_tokens = (
            cfg.lookup_min_ngram,
            cfg.lookup_max_ngram,
            cfg.lookup_max_tokens,
        )
        self.index, self.indexed = {}, 0
        self._extend(session.tokens)

    def _extend(self, tokens: list[int]) -> None:
        """Index every n-gram that ends before the last token (so a lookup never finds the suffix itself)."""
        for end in range(self.indexed, len(tokens) - 1):
            for n in range(self.min_ngram, min(self.max_ngram, end + 1) + 1):
                self.index[tuple(tokens[end + 1 - n : end + 1])] = end + 1
        self.indexed = max(self.indexed, len(tokens) - 1)

    def lookup(self, tokens: list[int], max_tokens: int) -> tuple[list[int], int]:
        """The continuation of the longest earlier match of the context's suffix, and how long that match
        really is (counted backwards past ``max_ngram``, up to ``MATCH_SPAN``); ``([], 0)`` if none."""
        self._extend(tokens)
        for n in range(min(self.max_ngram, len(tokens)), self.min_ngram - 1, -1):
            follow = self.index.get(tuple(tokens[-n:]))
            if follow is not None:
                length, last = n, len(tokens) - 1
                while (
                    length < MATCH_SPAN
                    and follow - 1 - length >= 0
                    and tokens[follow - 1 - length] == tokens[last - length]
                ):
                    length += 1
                return tokens[follow : follow + min(max_tokens, self.max_tokens)], length
        return [], 0

    def propose(self, session: Session, max_tokens: int) -> Draft:
        found, _ = self.lookup(session.tokens, max_tokens)
        return Draft(found, None, self.name) if found else Draft([], None, "plain")
