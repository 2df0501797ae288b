#!/usr/bin/env python
"""What a draft step costs against a full step on this machine, with and without quantized draft weights,
and what verifying ``k`` drafts costs: the figures that decide whether layer skipping can pay here.

Prints the CPU (and whether it has AMX), the dtype, the single-row linear timings behind ``dtype="auto"``,
a full step, draft steps at the default skip ratio (full vocabulary head and the reduced one) for each
``draft_quant``, verification costs as multiples of a full step, and the memory the quantized copies add.

Usage: python scripts/draft_costs.py [--model qwen2.5-coder-1.5b] [--dtype auto] [--context 300]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from clasp_decoding import GenerationConfig, load  # noqa: E402
from clasp_decoding.bench.run import machine_info  # noqa: E402
from clasp_decoding.context import model_state  # noqa: E402
from clasp_decoding.costs import dtype_timings, median_seconds  # noqa: E402
from clasp_decoding.draft_head import VocabSubset  # noqa: E402
from clasp_decoding.kv_cache import KVCache  # noqa: E402
from clasp_decoding.quant import draft_modules, extra_bytes  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-coder-1.5b")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--context", type=int, default=300)
    args = ap.parse_args()
    info = machine_info()
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    print(f"CPU: {info['cpu']} ({info['cpu_count']} cores), AMX: {'amx_bf16' in flags}, torch {info['torch']}")
    t = dtype_timings("cpu")
    print(f"single-row 2048x5632 product: bf16 {t['bf16'] * 1e3:.2f} ms, fp32 {t['fp32'] * 1e3:.2f} ms")
    model, _ = load(args.model, dtype=args.dtype, quiet=True)
    state = model_state(model)
    runner = state.runner
    cfg = GenerationConfig()
    num_skip = cfg.num_skipped(runner.num_layers)
    keep = list(range(runner.num_layers - num_skip))
    print(
        f"{args.model}: {runner.num_layers} layers, dtype {runner.dtype}, draft skips {num_skip}; numerics {runner.numerics}"
    )
    g = torch.Generator().manual_seed(0)
    n = args.context
    cache = KVCache(runner.num_layers, n + 70, runner.dtype)
    runner.forward(cache, torch.randint(100, 20000, (n,), generator=g), 0, last_only=True)

    def step(rows=1, **kw):
        x = torch.randint(100, 20000, (rows,), generator=g)

        def call():
            cache.rollback(n)
            logits, _ = runner.forward(cache, x, n, **kw)
            logits.argmax(-1).tolist()

        return 1000 * median_seconds(call, repeats=7)

    full = step(last_only=True)
    print(f"\n| what | ms | x full step |\n| --- | --- | --- |\n| full step (1 token) | {full:.1f} | 1.00 |")
    reduced = VocabSubset(runner.head, cfg.draft_vocab)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    added = {}
    for quant in ("none", "int8", "int4"):
        for label, vocab in (("full head", None), (f"{cfg.draft_vocab // 1024}k head", reduced)):
            modules = None
            if quant != "none":
                modules, vocab = draft_modules(state, quant, vocab)
                added[quant] = extra_bytes(modules) + extra_bytes([vocab.block])
            ms = step(layers=keep, last_only=True, vocab=vocab, modules=modules)
            print(
                f"| draft step, {num_skip} of {runner.num_layers} layers skipped, {label}, {quant} | {ms:.1f} | {ms / full:.2f} |"
            )
    limit = runner.numerics.max_verify_drafts
    for k in (1, 2, 4, 8, 16, 31):
        if limit is not None and k > limit:
            print(f"| verify {k} drafts | - | beyond the {limit} drafts this CPU keeps bit-exact |")
            continue
        ms = step(rows=k + 1)
        print(f"| verify {k} drafts | {ms:.1f} | {ms / full:.2f} |")
    for quant, b in added.items():
        print(
            f"{quant} draft copies add {b / 2**20:.0f} MiB = {100 * b / model_bytes:.0f}% of the model's {model_bytes / 2**20:.0f} MiB"
        )


if __name__ == "__main__":
    main()
