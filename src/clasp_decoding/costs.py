"""Costs measured on this machine, not assumed: which dtype decodes fastest, and what a model's full
step, draft step and verifications of 1..32 rows cost.

Why measure: CPUs differ more than their flags say. With AMX, verifying 8 tokens costs about one plain
step; on AVX2 or AVX-512 without it, a bf16 verification of ``k`` tokens can cost ``k`` steps, and bf16
single rows are still faster than fp32 although there are no bf16 instructions. The controller starts
from these figures (and keeps refining them online), so it drafts only where drafting can pay.
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import time
from dataclasses import dataclass, field

import torch

PROBE_SHAPE = (2048, 5632)
"""A linear layer of a ~1B model's MLP: big enough to be bound by reading the weights, as decoding is."""


def median_seconds(fn, repeats: int = 3) -> float:
    """The median wall time of ``repeats`` calls of ``fn``, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@functools.cache
def dtype_timings(device: str = "cpu", rounds: int = 7) -> dict[str, float]:
    """Seconds for one single-row product of :data:`PROBE_SHAPE` in bf16 and fp32 on ``device``, through
    the kernel decoding will use (on a CPU, the one :mod:`.cpu_linear` chose for that dtype): the fastest
    of ``rounds`` calls each, the two dtypes alternating so that a busy moment hits both."""
    from . import cpu_linear

    g = torch.Generator(device="cpu").manual_seed(0)
    w = torch.randn(PROBE_SHAPE[1], PROBE_SHAPE[0], generator=g)
    x = torch.randn(1, PROBE_SHAPE[0], generator=g)
    calls = {}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        wd, xd = w.to(device, dtype), x.to(device, dtype)
        if device == "cpu":
            f = cpu_linear.product(cpu_linear.choice(dtype).member(1), wd)
        else:
            f = lambda t, wd=wd: torch.nn.functional.linear(t, wd)
        calls[name] = lambda f=f, xd=xd: f(xd)
    best = dict.fromkeys(calls, float("inf"))
    with torch.inference_mode():
        for fn in calls.values():
            fn()
        for _ in range(rounds):
            for name, fn in calls.items():
                t0 = time.perf_counter()
                fn()
                best[name] = min(best[name], time.perf_counter() - t0)
    return best


def fastest_cpu_dtype() -> torch.dtype:
    """The dtype whose single-row matrix products (what plain decoding does per token) are faster here."""
    t = dtype_timings("cpu")
    return torch.bfloat16 if t["bf16"] <= t["fp32"] else torch.float32


class EMA:
    """An exponentially weighted mean that knows whether it has seen anything."""

    def __init__(self, decay: float = 0.8, value: float | None = None) -> None:
        self.decay, self.value = decay, value

    def update(self, x: float) -> None:
        self.value = x if self.value is None else self.decay * self.value + (1 - self.decay) * x


LADDER = (0, 1, 2, 4, 8, 16, 31)
"""Draft counts whose verification is timed (``k`` drafts = ``k + 1`` rows); counts between are
interpolated (:meth:`CostTable.rows`)."""


@dataclass
class CostTable:
    """A model's measured costs on this machine, in seconds: ``verify[k]`` verifies ``k`` drafts
    (``verify[0]`` is a plain step), ``draft_step[quant]`` is one layer-skip draft step at the default
    skip count per draft quantization."""

    verify: dict[int, float] = field(default_factory=dict)
    draft_step: dict[str, float] = field(default_factory=dict)
    num_skip: int = 0

    def rows(self, n: int) -> float | None:
        """Seconds of a pass over ``n`` rows (``verify[n - 1]``), interpolated between measured counts;
        ``None`` beyond the longest measured."""
        k = n - 1
        if k in self.verify:
            return self.verify[k]
        below = [c for c in self.verify if c < k]
        above = [c for c in self.verify if c > k]
        if not below or not above:
            return None
        lo, hi = max(below), min(above)
        return self.verify[lo] + (self.verify[hi] - self.verify[lo]) * (k - lo) / (hi - lo)

    def seed(self, state, quant: str = "none") -> None:
        """Start a controller's estimates (:class:`~.drafting.controller.ControllerState`) from these."""
        for k, seconds in self.verify.items():
            state.seed_verify.setdefault(k, seconds)  # scaled to the machine's speed now (controller)
        step = self.draft_step.get(quant)
        if step is not None and self.num_skip:
            state.draft_step.setdefault(self.num_skip, EMA(value=step))


def remembered(runner, **kw) -> CostTable:
    """:func:`measure`'s table for this model on this machine, kept in the cache folder so that later
    processes start from it (a model is known by its name or path, shapes and dtype, the machine by its
    CPU and kernel build). The controller refines every figure online anyway; a model without a name or
    path (built in memory) is measured every time. ``CLASP_REMEASURE=1`` measures again."""
    from .cpu_linear import _machine_key
    from .paths import cache_dir

    cfg = runner.config
    name = getattr(cfg, "_name_or_path", "") or ""
    if not name or runner.device.type != "cpu":
        return measure(runner, **kw)
    shapes = (cfg.model_type, runner.num_layers, getattr(cfg, "hidden_size", 0), runner.vocab_size, str(runner.dtype))
    key = f"{_machine_key()} | {name} | {shapes} | {runner.numerics.linear_mode} | {sorted(kw.items())}"
    path = cache_dir() / "costs.json"
    try:
        kept = json.loads(path.read_text())
    except (OSError, ValueError):
        kept = {}
    entry = kept.get(key)
    if entry and os.environ.get("CLASP_REMEASURE", "0") != "1":
        return CostTable({int(k): v for k, v in entry["verify"].items()}, entry["draft_step"], entry["num_skip"])
    table = measure(runner, **kw)
    kept[key] = {"verify": table.verify, "draft_step": table.draft_step, "num_skip": table.num_skip}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(kept))
        os.replace(tmp, path)
    except OSError:
        pass
    return table


def measure(runner, *, context: int = 256, num_skip: int | None = None, modules=None, quant: str = "none") -> CostTable:
    """Time a plain step, verifications up to :data:`LADDER`'s lengths (stopping early once a
    verification costs as many plain steps as it has rows: longer ones cannot pay either) and one
    draft step, over a ``context``-token cache of random tokens."""
    table = CostTable()
    limit = runner.numerics.max_verify_drafts
    longest = max(k for k in LADDER if limit is None or k <= limit)
    context = max(
        1, min(context, runner.max_positions - longest - 2, getattr(runner, "token_capacity", context) - longest - 2)
    )
    cache = runner.new_cache(context, longest + 1)
    try:
        return _measure(runner, cache, table, context, longest, num_skip, modules, quant)
    finally:
        runner.release_cache(cache)


def _measure(runner, cache, table: CostTable, context: int, longest: int, num_skip, modules, quant) -> CostTable:
    g = torch.Generator(device="cpu").manual_seed(0)
    vocab = min(runner.vocab_size, 20000)
    runner.forward(cache, torch.randint(3, vocab, (context,), generator=g).to(runner.device), 0, last_only=True)

    def timed(rows: int, **kw) -> float:
        x = torch.randint(3, vocab, (rows,), generator=g).to(runner.device)

        def call() -> None:
            cache.rollback(context)
            logits, _ = runner.forward(cache, x, context, **kw)
            logits.argmax(-1).tolist()  # the host sync every verification ends with

        return median_seconds(call, repeats=2)

    for k in LADDER:
        if k > longest:
            break
        table.verify[k] = timed(k + 1)
        if k >= 2 and table.verify[k] >= 0.9 * (k + 1) * table.verify[0]:
            break  # no batching gain: a longer verification cannot pay either
    if num_skip:
        keep = list(range(runner.num_layers - num_skip))  # a draft step's cost depends on how many layers run
        table.num_skip = num_skip
        table.draft_step[quant] = timed(1, layers=keep, last_only=True, modules=modules)
    return table
