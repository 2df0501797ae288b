"""Hybrid drafting under cost-aware control: prompt lookup where the context offers a match, the shared
suffix index where earlier requests do (when the generation has one), CLaSp's layer-skip draft
elsewhere, plain decoding when none pays (see :mod:`.controller`).

Lookup drafts may be long (up to ``hybrid_max_lookup`` tokens): the controller sizes each one from how
long the match is and what verifying that many tokens measured, so a repeated passage is drafted tens
of tokens at a time and a lone common token not at all. Where a copy source runs out before the planned
length, the draft goes on from the other copy source (a suffix draft by prompt lookup, a lookup draft by
the suffix index) for the rows verification takes at nearly no cost on this machine (on CPUs with
matrix units, up to the tile height); the controller's estimates count only the source's own part.
On the repeating workload this combination measured no gain (2.10x against 2.11x over ``ar``,
docs/results.md); it costs nothing where rows are not free, since then it adds none.

Verification is the loop's, unchanged, so the output is exactly the model's whatever each round chose.
``method="hybrid"`` uses both sources; ``method="clasp", adaptive=True`` uses the layer-skip draft alone
under the same control.

Layer selection costs about one full step, so here it is paid only for the layer-skip draft's sake:
a generation starts from the skip set last chosen for this model at each skip count (kept with the
controller's estimates), runs the DP on the prompt's hidden states only when it first drafts by layer
skipping and has no such set, and re-runs it after every ``layer_opt_interval`` rounds *of layer
skipping* (the paper's interval, counted in the rounds that use the skip set). When the controller moves
to another skip count, the set last chosen for it is adopted at once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..costs import remembered
from ..layer_select import every_other_middle
from .base import Draft, Drafter, Outcome, Selection, Source
from .controller import Controller, ControllerState
from .layer_skip import LayerSkipDrafter
from .lookup import MATCH_SPAN, PromptLookupDrafter

if TYPE_CHECKING:
    from ..config import GenerationConfig
    from ..state import DecodeState, ModelState

SKIP_RATIOS = (0.2, 0.3, 0.4, 0.5)
"""Skip counts the controller may choose among, as fractions of the layers (plus the configured one)."""


def controller_state(state: DecodeState) -> ControllerState:
    """This model's controller estimates for these sampling settings, kept across generations
    (acceptance differs between greedy decoding and each temperature, so each setting learns its own).
    A new set starts from the costs measured for the model, when they were."""
    p = state.config.sampling
    key = (
        "controller",
        0.0 if p.greedy else p.temperature,
        p.top_k,
        p.top_p,
        state.config.draft_quant,
        state.config.draft_vocab,
    )

    def make() -> ControllerState:
        fresh = ControllerState()
        costs = state.model.learned.get("costs")
        if costs is not None:
            costs.seed(fresh)
        return fresh

    return state.model.remember(key, make)


class HybridDrafter(Drafter):
    def __init__(self, use_lookup: bool = True) -> None:
        self.use_lookup = use_lookup
        self.lookup = PromptLookupDrafter()
        self.skip = LayerSkipDrafter(dynamic=True)
        self.controller: Controller | None = None
        self.estimates: ControllerState | None = None
        self.prompt_hidden: torch.Tensor | None = None
        self.match_len = 0
        self.primary: int | None = None  # this round's draft was continued past its source's tokens from here
        self.skip_rounds = 0  # rounds of layer skipping since the last layer selection
        self.drafting = Source.PLAIN  # this round's source (asked about before the verification)
        self.adapt_skip = True
        self.need_selection = False

    def wants_prefill_hidden(self) -> bool:
        return True  # one row of hidden states: nearly free, and the DP may need it later

    def warm_up(self, model: ModelState, config: GenerationConfig) -> None:
        """Measure this model's step and verification costs once (the controller starts from them)."""
        runner = model.runner
        model.remember("costs", lambda: remembered(runner, num_skip=config.num_skipped(runner.num_layers)))
        self.skip.warm_up(model, config)

    def start(self, state: DecodeState, prompt_hidden: torch.Tensor | None) -> Selection | None:
        cfg = state.config
        if self.use_lookup:
            self.lookup.start(state, prompt_hidden)
            self.lookup.max_tokens = cfg.hybrid_max_lookup  # the controller picks the length within it
        layers = state.runner.num_layers
        candidates = {max(1, min(layers - 1, round(r * layers))) for r in SKIP_RATIOS} | {cfg.num_skipped(layers)}
        self.estimates = controller_state(state)
        self.controller = Controller(self.estimates, max_draft=cfg.max_draft_tokens, candidates=sorted(candidates))
        self.adapt_skip = cfg.skip_layers is None and cfg.num_skip is None
        num_skip = self.controller.choose_num_skip(cfg.num_skipped(layers)) if self.adapt_skip else None
        fixed = self.skip.prepare(state, num_skip)
        self.prompt_hidden = prompt_hidden
        if fixed is not None:
            return fixed
        remembered = self.estimates.skip_sets.get(self.skip.num_skip)
        return self.skip.adopt(state, remembered) if remembered is not None else None

    def wants_hidden(self, state: DecodeState) -> bool:
        if not self.skip.dynamic:
            return False
        if self.need_selection:
            return True
        return self.drafting is Source.LAYER_SKIP and self.skip_rounds + 1 >= state.config.layer_opt_interval

    def _ensure_skip_set(self, state: DecodeState) -> Selection | None:
        """A skip set for a first layer-skip draft. Right after the prefill the DP runs on the prompt's
        last token; later the prompt's slots are no longer the cache's edge (the DP's candidates write
        the slots after their token), so every other middle layer stands in until the next
        verification brings fresh hidden states for the DP."""
        if self.skip.skip or not self.skip.num_skip:
            return None
        if state.generated == 1 and self.prompt_hidden is not None:
            chosen = self.skip.select(state, self.prompt_hidden, state.prompt_len - 1)
            self.estimates.skip_sets[self.skip.num_skip] = chosen.skip
            self.controller.charge_selection(self.skip.num_skip, chosen.seconds)
            return chosen
        self.need_selection = True
        return self.skip.adopt(state, every_other_middle(state.runner.num_layers, self.skip.num_skip))

    def propose(self, state: DecodeState, max_tokens: int) -> Draft:
        found, self.match_len = (
            self.lookup.index.lookup(state.tokens, min(max_tokens, self.lookup.max_tokens))
            if self.use_lookup
            else ([], 0)
        )
        suffix = None
        if self.use_lookup and state.suffix is not None:
            suffix = state.suffix.draft(state.tokens, min(max_tokens, state.config.hybrid_max_lookup), state.scope)
        plan = self.controller.plan(
            self.skip.num_skip,
            len(found),
            max_tokens,
            self.match_len,
            state.solo,
            suffix_len=len(suffix.tokens) if suffix else 0,
            suffix_match=suffix.match if suffix else 1,
        )
        self.drafting = plan.source
        self.primary = None
        if plan.source is Source.LOOKUP:
            return self._continued(state, found, plan.max_tokens, max_tokens, Source.LOOKUP)
        if plan.source is Source.SUFFIX:
            self.match_len = suffix.match
            return self._continued(state, suffix.tokens, plan.max_tokens, max_tokens, Source.SUFFIX)
        if plan.source is Source.LAYER_SKIP:
            switched = None
            if self.adapt_skip and plan.num_skip is not None and plan.num_skip != self.skip.num_skip:
                switched = self._switch(state, plan.num_skip)
            selection = self._ensure_skip_set(state) or switched
            draft = self.skip.propose(state, plan.max_tokens)
            draft.selection = selection
            return draft
        return Draft([])

    def _continued(self, state: DecodeState, found: list[int], planned: int, budget: int, source: Source) -> Draft:
        """A copy draft of ``planned`` tokens; where its source ran out before the controller's plan did,
        continued from the other copy source (prompt lookup after a suffix draft, the suffix index after
        a lookup draft) for as many tokens as verification takes at nearly no cost here."""
        tokens = found[:planned]
        if len(found) > planned or not self.use_lookup:
            return Draft(tokens, source)
        room = self.controller.free_rows(len(tokens), budget)
        more: list[int] = []
        if room > 0 and source is Source.SUFFIX:
            more = self.lookup.index.peek(state.tokens, tokens, room)
        elif room > 0 and state.suffix is not None:
            found = state.suffix.draft(state.tokens[-MATCH_SPAN:] + tokens, room, state.scope)
            more = found.tokens if found is not None else []
        if more:
            self.primary = len(tokens)  # the controller's estimates are of the source's own tokens
        return Draft(tokens + more, source)

    def _switch(self, state: DecodeState, num_skip: int) -> Selection | None:
        """Draft at another skip count from now on, with the set last chosen for it (none yet: the next
        draft gets one)."""
        self.skip.num_skip = num_skip
        remembered = self.estimates.skip_sets.get(num_skip)
        if remembered is not None:
            return self.skip.adopt(state, remembered)
        self.skip.skip = ()
        return None

    def observe(self, state: DecodeState, outcome: Outcome) -> Selection | None:
        draft = outcome.draft
        own = len(draft) if self.primary is None else self.primary  # a continued draft: its source's part
        self.controller.observe(
            draft.source,
            own,
            min(outcome.accepted, own),
            outcome.verify_seconds,
            outcome.draft_seconds,
            self.skip.num_skip,
            self.match_len,
        )
        self.skip_rounds += draft.source is Source.LAYER_SKIP
        if outcome.hidden is None or not self.skip.dynamic:
            return None
        if self.adapt_skip and not self.need_selection:
            self.skip.num_skip = self.controller.choose_num_skip(self.skip.num_skip)
        self.need_selection = False
        self.skip_rounds = 0
        chosen = self.skip.observe(state, outcome)
        if chosen is not None:
            self.controller.charge_selection(self.skip.num_skip, chosen.seconds)
            self.estimates.skip_sets[self.skip.num_skip] = chosen.skip
        return chosen
