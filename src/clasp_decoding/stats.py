"""Per-generation statistics, counted the same way for every method (Spec-Bench's arithmetic)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class GenerationStats:
    """What one generation did and where its time went.

    ``steps`` counts full-model forwards that produced tokens: the prefill and one verification per
    round. Plain decoding therefore scores ``mean_accepted_tokens == 1.0``.
    """

    prompt_tokens: int = 0
    reused_tokens: int = 0  # prompt tokens whose cache came from an earlier request (prefix reuse)
    new_tokens: int = 0
    steps: int = 0
    drafted: int = 0
    accepted: int = 0
    accepted_lengths: list[int] = field(default_factory=list)
    draft_lengths: list[int] = field(default_factory=list)
    skip_sets: list[tuple[int, tuple[int, ...]]] = field(default_factory=list)
    modes: list[str] = field(default_factory=list)
    time_prefill: float = 0.0
    time_draft: float = 0.0
    time_verify: float = 0.0
    time_select: float = 0.0
    time_total: float = 0.0
    layer_selections: int = 0

    @property
    def mean_accepted_tokens(self) -> float:
        """New tokens per full-model step (``tau``): 1.0 for plain decoding."""
        return self.new_tokens / self.steps if self.steps else 0.0

    @property
    def acceptance_rate(self) -> float:
        """Accepted draft tokens over proposed draft tokens (0 when nothing was drafted)."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.time_total if self.time_total > 0 else 0.0

    @property
    def time_other(self) -> float:
        """Loop overhead: everything not spent in prefill, drafting, verifying or selecting layers."""
        return max(0.0, self.time_total - self.time_prefill - self.time_draft - self.time_verify - self.time_select)

    def to_dict(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "reused_tokens": self.reused_tokens,
            "new_tokens": self.new_tokens,
            "steps": self.steps,
            "mean_accepted_tokens": round(self.mean_accepted_tokens, 4),
            "drafted": self.drafted,
            "accepted": self.accepted,
            "acceptance_rate": round(self.acceptance_rate, 4),
            "tokens_per_second": round(self.tokens_per_second, 4),
            "time": {
                "total": round(self.time_total, 4),
                "prefill": round(self.time_prefill, 4),
                "draft": round(self.time_draft, 4),
                "verify": round(self.time_verify, 4),
                "layer_selection": round(self.time_select, 4),
                "other": round(self.time_other, 4),
            },
            "layer_selections": self.layer_selections,
            "skip_sets": [{"step": s, "layers": list(layers)} for s, layers in self.skip_sets],
            "accepted_lengths": list(self.accepted_lengths),
            "draft_lengths": list(self.draft_lengths),
            "modes": list(self.modes),
        }
