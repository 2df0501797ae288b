"""CLaSp's draft: the model itself with a skip set of layers, stopped at the draft-exiting threshold.

The skip set is either re-chosen by the dynamic program every ``layer_opt_interval`` rounds from the
hidden states the verification returns (``dynamic=True``: CLaSp), or fixed (``dynamic=False``: a given
set, or every other middle layer).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from ..draft_head import VocabSubset
from ..layer_select import clasp_dp, every_other_middle
from ..quant import draft_modules, resolve, sample_layer
from .base import Draft, Drafter, Outcome, Selection, Source

if TYPE_CHECKING:
    from ..config import GenerationConfig
    from ..state import DecodeState, ModelState


class LayerSkipDrafter(Drafter):
    """Draft with the model's own layers minus a skip set (optionally through quantized copies of the
    kept layers, :mod:`..quant`)."""

    def __init__(self, dynamic: bool = True) -> None:
        self.dynamic = dynamic
        self.num_skip = 0
        self.skip: tuple[int, ...] = ()
        self.keep: tuple[int, ...] = ()
        self.vocab: VocabSubset | None = None
        self.modules = None  # stand-in modules for the kept layers (a quantized draft), or None
        self.quant = "none"

    def wants_prefill_hidden(self) -> bool:
        return self.dynamic

    def warm_up(self, model: ModelState, config: GenerationConfig) -> None:
        """Quantized copies of the layers, made once per model (before any cache is in use), and whatever
        the runner prepares to run them (the graph runner's graphs)."""
        quant = resolve(config.draft_quant, model.runner.device, sample_layer(model.runner))
        if quant != "none":
            vocab = model.runner.vocab_size
            limit = config.draft_vocab if 0 < config.draft_vocab < vocab else vocab
            layers, _ = draft_modules(model, quant, VocabSubset(model.runner.head, limit))
            model.runner.prepare(layers)

    def prepare(self, state: DecodeState, num_skip: int | None = None) -> Selection | None:
        """This generation's draft: skip count, draft head, quantized layers; a fixed skip set if the
        config gives one (then returned)."""
        cfg = state.config
        runner = state.runner
        self.num_skip = num_skip if num_skip is not None else cfg.num_skipped(runner.num_layers)
        if cfg.draft_vocab and cfg.draft_vocab < runner.vocab_size:
            self.vocab = VocabSubset(runner.head, cfg.draft_vocab, state.tokens)
        self.quant = resolve(cfg.draft_quant, runner.device, sample_layer(runner))
        if self.quant != "none":
            self.modules, self.vocab = draft_modules(state.model, self.quant, self.vocab)
        if cfg.skip_layers is not None:
            self.dynamic = False
            return self.adopt(state, tuple(sorted(set(cfg.skip_layers))))
        return None

    def start(self, state: DecodeState, prompt_hidden: torch.Tensor | None) -> Selection | None:
        fixed = self.prepare(state)
        if fixed is not None:
            return fixed
        if self.dynamic and prompt_hidden is not None:
            return self.select(state, prompt_hidden, state.prompt_len - 1)
        return self.adopt(state, every_other_middle(state.runner.num_layers, self.num_skip))

    def adopt(self, state: DecodeState, skip: tuple[int, ...], seconds: float = 0.0, ran_dp: bool = False) -> Selection:
        """Draft with ``skip`` from now on."""
        self.skip = skip
        dropped = set(skip)
        self.keep = tuple(i for i in state.runner.all_layers if i not in dropped)
        return Selection(skip, seconds, ran_dp)

    def select(self, state: DecodeState, hidden: torch.Tensor, position: int) -> Selection:
        """Run CLaSp's DP on the hidden states ``[L + 1, d]`` of the (verified) token at ``position``."""
        t0 = time.perf_counter()
        runner, cache = state.runner, state.cache
        modules = self.modules  # the DP scores the draft that will run: quantized layers if it uses them

        def run_layer(i: int, states: torch.Tensor) -> torch.Tensor:
            return runner.layer_candidates(cache, i - 1, states, position, None if modules is None else modules[i - 1])

        skip = clasp_dp(hidden, self.num_skip, run_layer)
        return self.adopt(state, skip, time.perf_counter() - t0, ran_dp=True)

    def wants_hidden(self, state: DecodeState) -> bool:
        return self.dynamic and (state.round + 1) % state.config.layer_opt_interval == 0

    def propose(self, state: DecodeState, max_tokens: int) -> Draft:
        if not state.solo:
            return Draft([])
        runner, cache, sampler = state.runner, state.cache, state.sampler
        threshold = state.config.draft_exit_threshold
        max_tokens = min(max_tokens, state.config.max_draft_tokens)
        token = torch.tensor([state.last_token], device=runner.device)
        position = state.position
        tokens: list[int] = []
        dists: list[torch.Tensor] = []
        for _ in range(max_tokens):
            logits, _ = runner.forward(
                cache, token, position, layers=self.keep, last_only=True, vocab=self.vocab, modules=self.modules
            )
            nxt, conf, full = sampler.propose(logits[0], position + 1, self.vocab)
            if full is not None:
                dists.append(full)
            tok, c = torch.stack([nxt.double(), conf.double()]).tolist()  # the draft's one sync per step
            tokens.append(int(tok))
            position += 1
            if c < threshold or int(tok) in state.eos_ids:
                break
            token = nxt.view(1)
        return Draft(tokens, Source.LAYER_SKIP, torch.stack(dists) if dists else None)

    def observe(self, state: DecodeState, outcome: Outcome) -> Selection | None:
        if self.dynamic and outcome.hidden is not None:
            # The last verified input of this round sits at row ``accepted`` of the verification.
            return self.select(state, outcome.hidden[:, outcome.accepted], state.position - 1)
        return None
