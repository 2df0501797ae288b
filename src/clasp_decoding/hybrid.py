"""Hybrid drafting under cost-aware control: prompt lookup where the context offers a match, CLaSp's
layer-skip draft elsewhere, plain decoding when neither pays (see :mod:`.controller`).

Verification is the loop's, unchanged, so the output is exactly the model's whatever each round chose.
``method="hybrid"`` uses both sources; ``method="clasp", adaptive=True`` uses the layer-skip draft alone
under the same control.
"""

from __future__ import annotations

import torch

from .controller import Controller, ControllerState
from .drafters import Draft, Drafter, LayerSkipDrafter, PromptLookupDrafter
from .session import Session

SKIP_RATIOS = (0.2, 0.3, 0.4, 0.5)
"""Skip counts the controller may choose among, as fractions of the layers (plus the configured one)."""


def controller_state(runner) -> ControllerState:
    """The runner's controller estimates, created on first use and kept across generations."""
    state = getattr(runner, "controller_state", None)
    if state is None:
        state = runner.controller_state = ControllerState(runner.num_layers)
    return state


class HybridDrafter(Drafter):
    name = "hybrid"

    def __init__(self, use_lookup: bool = True) -> None:
        self.use_lookup = use_lookup
        self.lookup = PromptLookupDrafter()
        self.skip = LayerSkipDrafter(dynamic=True)
        self.controller: Controller | None = None
        self.rounds_since_layer_skip = 0

    def wants_prefill_hidden(self) -> bool:
        return True

    def start(self, session: Session, prompt_hidden: torch.Tensor | None) -> None:
        cfg = session.config
        if self.use_lookup:
            self.lookup.start(session, prompt_hidden)
        layers = session.runner.num_layers
        state = controller_state(session.runner)
        candidates = {max(1, min(layers - 1, round(r * layers))) for r in SKIP_RATIOS} | {cfg.num_skipped(layers)}
        self.controller = Controller(state, max_draft=cfg.max_draft_tokens, candidates=sorted(candidates))
        start_skip = None
        if cfg.skip_layers is None and cfg.num_skip is None:
            # Start from the skip count that has served this model best so far.
            start_skip = self.controller.choose_num_skip(cfg.num_skipped(layers))
        self.skip.start(session, prompt_hidden, num_skip=start_skip)

    def wants_hidden(self, session: Session) -> bool:
        # Layer selection only while the layer-skip draft is in use (or about to be probed).
        return self.skip.wants_hidden(session) and self.rounds_since_layer_skip <= session.config.layer_opt_interval

    def propose(self, session: Session, max_tokens: int) -> Draft:
        found = self.lookup.lookup(session.tokens, max_tokens) if self.use_lookup else []
        plan = self.controller.plan(self.skip.num_skip, len(found), max_tokens)
        if plan.source == "pld":
            return Draft(found[: plan.max_tokens], None, "pld")
        if plan.source == "clasp":
            draft = self.skip.propose(session, plan.max_tokens)
            draft.source = "clasp"
            return draft
        return Draft([], None, "plain")

    def observe(self, session: Session, draft: Draft, accepted: int, hidden: torch.Tensor | None) -> None:
        self.controller.observe(draft.source, len(draft), accepted, session.verify_seconds, session.draft_seconds,
                                self.skip.num_skip)
        self.rounds_since_layer_skip = 0 if draft.source == "clasp" else self.rounds_since_layer_skip + 1
        if hidden is not None and self.skip.dynamic and session.config.skip_layers is None and session.config.num_skip is None:
            self.skip.num_skip = self.controller.choose_num_skip(self.skip.num_skip)
        self.skip.observe(session, draft, accepted, hidden)
