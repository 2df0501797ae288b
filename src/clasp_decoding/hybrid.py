"""Hybrid drafting under cost-aware control: prompt lookup where the context offers a match, CLaSp's
layer-skip draft elsewhere, plain decoding when neither pays (see :mod:`.controller`).

Lookup drafts may be long (up to ``hybrid_max_lookup`` tokens): the controller sizes each one from how
long the match is and what verifying that many tokens measured, so a repeated passage is drafted tens
of tokens at a time and a lone common token not at all.

Verification is the loop's, unchanged, so the output is exactly the model's whatever each round chose.
``method="hybrid"`` uses both sources; ``method="clasp", adaptive=True`` uses the layer-skip draft alone
under the same control.

Layer selection costs about one full step, so here it is paid only for the layer-skip draft's sake:
a generation starts from the skip set last chosen for this model (kept with the controller's
estimates), runs the DP on the prompt's hidden states only when it first drafts by layer skipping and
has no such set, and re-runs it every ``layer_opt_interval`` rounds only while layer skipping is in use.
"""

from __future__ import annotations

import torch

from .controller import EMA, LENGTH_LADDER, Controller, ControllerState
from .drafters import Draft, Drafter, LayerSkipDrafter, PromptLookupDrafter
from .layer_select import every_other_middle
from .session import Session

SKIP_RATIOS = (0.2, 0.3, 0.4, 0.5)
"""Skip counts the controller may choose among, as fractions of the layers (plus the configured one)."""


FIXED_COST_PER_DRAFT = 0.015
"""Seeded sampling's verification-cost model, in plain steps per drafted token (measured here: 8 drafts
cost 1.10 steps, 24 drafts 1.36; scripts/verify_cost.py)."""


def controller_state(runner, sampling) -> ControllerState:
    """The runner's controller estimates for these sampling settings, created on first use and kept
    across generations (acceptance differs between greedy decoding and each temperature, so each
    setting learns its own)."""
    states = getattr(runner, "controller_states", None)
    if states is None:
        states = runner.controller_states = {}
    key = (sampling.temperature, sampling.top_k, sampling.top_p)
    if key not in states:
        states[key] = ControllerState(runner.num_layers)
    return states[key]


class HybridDrafter(Drafter):
    name = "hybrid"

    def __init__(self, use_lookup: bool = True) -> None:
        self.use_lookup = use_lookup
        self.lookup = PromptLookupDrafter()
        self.skip = LayerSkipDrafter(dynamic=True)
        self.controller: Controller | None = None
        self.state: ControllerState | None = None
        self.prompt_hidden: torch.Tensor | None = None
        self.match_len = 0
        self.rounds_since_layer_skip = 1 << 30  # no layer selection until layer skipping is used
        self.adapt_skip = True
        self.need_selection = False

    def wants_prefill_hidden(self) -> bool:
        return True  # one row of hidden states: nearly free, and the DP may need it later

    def start(self, session: Session, prompt_hidden: torch.Tensor | None) -> None:
        cfg = session.config
        if self.use_lookup:
            self.lookup.start(session, prompt_hidden)
            self.lookup.max_tokens = cfg.hybrid_max_lookup  # the controller picks the length within it
        layers = session.runner.num_layers
        candidates = {max(1, min(layers - 1, round(r * layers))) for r in SKIP_RATIOS} | {cfg.num_skipped(layers)}
        if cfg.seed is not None and not cfg.sampling.greedy and self.use_lookup:
            # A seed must reproduce the sample. Which drafts a round makes changes which random numbers
            # the sampler draws, so no decision may depend on timings or on earlier requests: a fresh
            # state, a fixed verification-cost model instead of measured times, lookup drafts only.
            self.state = ControllerState(layers, fixed_costs=True)
            for k in (0, *LENGTH_LADDER):
                self.state.verify[k] = EMA(value=1.0 + FIXED_COST_PER_DRAFT * k)
            self.controller = Controller(self.state, max_draft=cfg.max_draft_tokens, candidates=[], layer_skip=False)
        else:
            self.state = controller_state(session.runner, cfg.sampling)
            self.controller = Controller(self.state, max_draft=cfg.max_draft_tokens, candidates=sorted(candidates))
        self.adapt_skip = cfg.skip_layers is None and cfg.num_skip is None
        num_skip = self.controller.choose_num_skip(cfg.num_skipped(layers)) if self.adapt_skip else None
        self.skip.configure(session, num_skip)
        self.prompt_hidden = prompt_hidden
        if cfg.skip_layers is None:
            remembered = self.state.skip_sets.get(self.skip.num_skip)
            if remembered is not None:
                self.skip.use(session, remembered)

    def wants_hidden(self, session: Session) -> bool:
        if not self.skip.dynamic:
            return False
        if self.need_selection:
            return True
        return self.skip.wants_hidden(session) and self.rounds_since_layer_skip <= session.config.layer_opt_interval

    def _ensure_skip_set(self, session: Session) -> None:
        """A skip set for a first layer-skip draft. Right after the prefill the DP runs on the prompt's
        last token; later the prompt's slots are no longer the cache's edge (the DP's candidates write
        the slots after their token), so every other middle layer stands in until the next
        verification brings fresh hidden states for the DP."""
        if self.skip.skip or not self.skip.num_skip:
            return
        if session.generated == 1 and self.prompt_hidden is not None:
            self.skip.select(session, self.prompt_hidden, session.prompt_len - 1)
            self.state.skip_sets[self.skip.num_skip] = self.skip.skip
        else:
            self.skip.use(session, every_other_middle(session.runner.num_layers, self.skip.num_skip))
            self.need_selection = True

    def propose(self, session: Session, max_tokens: int) -> Draft:
        found, self.match_len = self.lookup.lookup(session.tokens, max_tokens) if self.use_lookup else ([], 0)
        plan = self.controller.plan(self.skip.num_skip, len(found), max_tokens, self.match_len)
        if plan.source == "pld":
            return Draft(found[: plan.max_tokens], None, "pld")
        if plan.source == "clasp":
            self._ensure_skip_set(session)
            draft = self.skip.propose(session, plan.max_tokens)
            draft.source = "clasp"
            return draft
        return Draft([], None, "plain")

    def observe(self, session: Session, draft: Draft, accepted: int, hidden: torch.Tensor | None) -> None:
        self.controller.observe(
            draft.source,
            len(draft),
            accepted,
            session.verify_seconds,
            session.draft_seconds,
            self.skip.num_skip,
            self.match_len,
        )
        self.rounds_since_layer_skip = 0 if draft.source == "clasp" else self.rounds_since_layer_skip + 1
        if hidden is None or not self.skip.dynamic:
            return
        if self.adapt_skip and not self.need_selection:
            self.skip.num_skip = self.controller.choose_num_skip(self.skip.num_skip)
        self.need_selection = False
        before = session.stats.time_select
        self.skip.observe(session, draft, accepted, hidden)
        self.controller.charge_selection(self.skip.num_skip, session.stats.time_select - before)
        self.state.skip_sets[self.skip.num_skip] = self.skip.skip
