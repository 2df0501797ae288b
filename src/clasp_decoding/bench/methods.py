"""Benchmark methods: what each name runs, and one turn of one question measured the same way for all.

A method is a name from :data:`KINDS` (``hf`` and the engine's drafting methods), optionally with
generation options in brackets, so sweeps are plain method lists:
``clasp[num_skip=8,draft_exit_threshold=0.8]``. Its label is the whole string. ``index=1`` gives a method
one suffix index for the whole run (``hybrid[index=1]``): it drafts from the earlier requests.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ..api import eos_ids_of, generation
from ..baselines import hf_generate
from ..config import GenerationConfig
from ..drafting.registry import METHODS
from ..errors import ConfigError
from .suite import BenchInputError

HF = "hf"
LLAMACPP = "llamacpp"
PEERS = (HF, LLAMACPP)
KINDS = (*PEERS, *METHODS)
"""``hf``: transformers' own generate (on an untouched copy of the model); ``llamacpp``: llama.cpp on the
same weights in bf16 (:mod:`.llamacpp`); the others are the engine's drafting methods (``ar`` is plain
decoding through the project's runner; ``static`` uses the skip set found by :mod:`.static`)."""


@dataclass(frozen=True)
class MethodSpec:
    label: str
    kind: str
    overrides: tuple[tuple[str, object], ...] = ()
    index: bool = False  # one suffix index for the whole run, learning every request as it completes

    def config(self, base: GenerationConfig) -> GenerationConfig:
        method = "ar" if self.kind in PEERS else self.kind
        return base.updated(method=method, **dict(self.overrides))


def _value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    if "|" in text:  # a tuple such as skip_layers=3|5|7
        return tuple(int(x) for x in text.split("|"))
    return text


def parse_methods(text: str) -> list[MethodSpec]:
    """Parse ``"ar,hf,clasp[num_skip=8,draft_exit_threshold=0.8],pld"``; every error names the method."""
    specs, depth, start = [], 0, 0
    parts = []
    for i, ch in enumerate(text + ","):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    for part in parts:
        if not part:
            continue
        kind, _, rest = part.partition("[")
        kind = kind.strip()
        if kind not in KINDS:
            raise BenchInputError(f"Unknown method {kind!r}; known: {', '.join(KINDS)}.")
        overrides = []
        if rest:
            if not rest.endswith("]"):
                raise BenchInputError(f"Method {part!r}: options must end with ']'.")
            for item in rest[:-1].split(","):
                if not item.strip():
                    continue
                key, eq, value = item.partition("=")
                if not eq:
                    raise BenchInputError(f"Method {part!r}: option {item!r} is not key=value.")
                overrides.append((key.strip(), _value(value.strip())))
        index = bool(dict(overrides).pop("index", False))
        overrides = [(k, v) for k, v in overrides if k != "index"]
        if index and kind in PEERS:
            raise BenchInputError(f"Method {part!r}: a suffix index serves the engine's methods only.")
        spec = MethodSpec(part, kind, tuple(overrides), index)
        try:
            spec.config(GenerationConfig())
        except ConfigError as e:
            raise BenchInputError(f"Method {part!r}: {e}") from None
        specs.append(spec)
    if not specs:
        raise BenchInputError("No methods given.")
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        raise BenchInputError(f"Methods listed twice: {labels}.")
    return specs


@dataclass
class TurnResult:
    """One turn of one question under one method."""

    output_ids: list[int]
    text: str
    seconds: float
    steps: int
    drafted: int = 0
    accepted: int = 0
    accepted_lengths: list[int] = field(default_factory=list)
    draft_lengths: list[int] = field(default_factory=list)
    skip_sets: list[list] = field(default_factory=list)
    modes: list[str] = field(default_factory=list)
    time_split: dict = field(default_factory=dict)


def run_turn(
    model, tokenizer, spec: MethodSpec, base: GenerationConfig, prompt_ids: list[int], peers: dict | None = None
) -> TurnResult:
    """Generate one answer; time it from the first model call to the last token, for every method alike.
    ``peers`` holds what the peer methods run on: ``hf`` an untouched copy of the model (the ``generate``
    users have), ``llamacpp`` a loaded :class:`~.llamacpp.LlamaCpp`."""
    cfg = spec.config(base)
    peers = {} if peers is None else peers
    if spec.kind in PEERS:
        eos = eos_ids_of(model, tokenizer)
        if spec.kind == HF:
            ids, seconds = hf_generate(peers.get(HF, model), tokenizer, prompt_ids, cfg, eos)
        else:
            ids, seconds = peers[LLAMACPP].generate(prompt_ids, cfg.max_new_tokens, eos)
        text = tokenizer.decode(ids, skip_special_tokens=True)
        return TurnResult(ids, text, seconds, steps=len(ids))
    index = None
    if spec.index:
        from ..suffix_index import SuffixIndex

        index = peers.setdefault("indexes", {}).setdefault(spec.label, SuffixIndex())
    t0 = time.perf_counter()
    result = generation(model, tokenizer, prompt_ids, cfg, suffix_index=index).run()
    seconds = time.perf_counter() - t0
    st = result.stats
    return TurnResult(
        output_ids=result.token_ids,
        text=result.text,
        seconds=seconds,
        steps=st.steps,
        drafted=st.drafted,
        accepted=st.accepted,
        accepted_lengths=list(st.accepted_lengths),
        draft_lengths=list(st.draft_lengths),
        skip_sets=[[s, list(layers)] for s, layers in st.skip_sets],
        modes=list(st.modes),
        time_split=st.to_dict()["time"],
    )
