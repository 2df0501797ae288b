#!/usr/bin/env python
"""The one prepared check for a GPU machine (no checkpoint reaches it: models are random, built from
configs). Each check runs in its own ``try``, so one failure never hides the others; the whole run takes
under 4 minutes on one H100/H200-class card.

1. **Exactness**: a tiny fp32 model, greedy ``clasp`` and ``hybrid`` through the graph runner (captured
   CUDA graphs) against ``transformers``' greedy ``generate`` on an untouched copy (a count: the graph
   runner attends batched, so equality is expected but not guaranteed at near-ties).
2. **Split placement**: the tiny model with half its layers on the GPU and half on the CPU through
   ``accelerate``'s ``device_map`` (the eager runner), greedy ``hybrid`` against ``generate`` placed alike.
3. **LLaMA-3-8B shape** (32 layers, bf16, batch 1): per-call costs (full step, draft step at 50% of layers
   skipped, plain / int8 / int4 draft weights, verification of 8, a DP run), then every method and both
   baselines on an untouched copy: eager ``generate`` (dynamic cache) and static-cache ``generate``
   (compiled by ``transformers``), each warmed with the configuration it is timed with; prefill and
   decode timed apart; mean accepted tokens and acceptance (draft-exit threshold 0: a random model's
   drafts are never confident, and would otherwise all be one token long).
4. **80 layers** at the same width (~17B parameters): the DP at 40 skipped layers (candidate calls in
   chunks), a draft step, and ``clasp`` end to end.

Writes ``gpu_check.md`` (the tables, with the card's name) and ``gpu_check.json`` to ``$OUT`` (or the
current folder), and prints the markdown.

Usage:  python scripts/gpu_check.py            (on a GPU machine)
        python scripts/gpu_check.py --dry-run  (anywhere: tiny widths on the CPU, graphs captured through
                                                the CPU stand-in; CI runs it)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from clasp_decoding import GenerationConfig  # noqa: E402
from clasp_decoding.api import generation  # noqa: E402
from clasp_decoding.context import model_state, runner_for, use_graphs  # noqa: E402
from clasp_decoding.layer_select import clasp_dp, every_other_middle  # noqa: E402
from clasp_decoding.quant import draft_modules  # noqa: E402

PEAK_BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12}  # bytes/s, SXM parts


class Run:
    """What every check needs: the device, whether this is a dry run, the sizes to use."""

    def __init__(self, dry: bool) -> None:
        self.dry = dry
        self.device = torch.device("cpu" if dry else "cuda")
        self.new_tokens = 12 if dry else 64
        self.context = 48 if dry else 512
        self.card = "CPU (dry run, CUDA graphs through the CPU stand-in)" if dry else torch.cuda.get_device_name(0)


def llama_config(run: Run, layers: int = 32):
    from transformers import LlamaConfig

    if run.dry:
        return LlamaConfig(
            vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=min(layers, 8 if layers <= 32 else 12),
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        )  # fmt: skip
    return LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
    )  # fmt: skip


def tiny_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512,
    )  # fmt: skip


def build(config, dtype, device, seed: int = 0):
    """A random model; the same seed gives the same weights (a second build is an untouched copy, with a
    config of its own). No end-of-sequence id: every generation runs its full length, ours and
    ``generate``'s alike."""
    import copy

    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(config)
    config.eos_token_id = None
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.generation_config.eos_token_id = None
    return model.eval()


def release() -> None:
    """Free what the previous check left (compiled code and its graphs sit in reference cycles)."""
    import gc

    gc.collect()
    torch._dynamo.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeat: int = 20, warm: int = 3) -> float:
    """Median milliseconds of ``fn``."""
    for _ in range(warm):
        fn()
    sync(device)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def prompt_of(n: int, vocab: int, seed: int = 0) -> list[int]:
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.inference_mode()
def hf_tokens(model, prompt: list[int], n: int, static: bool = False) -> list[int]:
    ids = torch.tensor([prompt], device=model.device)
    kw = dict(cache_implementation="static") if static else {}
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False,
        eos_token_id=None, pad_token_id=0, top_k=None, top_p=None, temperature=None, **kw,
    )  # fmt: skip
    return out[0, len(prompt) :].tolist()


# ----------------------------------------------------------------------------- 1. exactness


def check_tiny(run: Run) -> list[dict]:
    model = build(tiny_config(), torch.float32, run.device)
    plain = build(tiny_config(), torch.float32, run.device)  # untouched: transformers' generate
    use_graphs(model, capacity=256)
    rows = []
    for method in ("clasp", "hybrid"):
        cfg = GenerationConfig(max_new_tokens=32, method=method, num_skip=2, draft_exit_threshold=0.0)
        same = 0
        for seed in range(4):
            prompt = prompt_of(8 + 3 * seed, 97, seed)
            same += generation(model, None, prompt, cfg).run().token_ids == hf_tokens(plain, prompt, 32)
        rows.append(
            {"check": f"tiny fp32, greedy `{method}` through captured graphs = `generate`", "result": f"{same}/4"}
        )
    rows.append({"check": "graphs captured inside a round", "result": str(runner_for(model).late_captures)})
    return rows


# ----------------------------------------------------------------------------- 2. split placement


def check_split(run: Run) -> list[dict]:
    """Layers 0-2 (and the embedding) on the GPU, 3-5, the norm and the head on the CPU."""
    from accelerate import dispatch_model

    def placed(seed_model):
        if run.dry:
            return seed_model
        gpu, cpu = 0, "cpu"
        device_map = {"model.embed_tokens": gpu, "model.rotary_emb": gpu, "model.norm": cpu, "lm_head": cpu}
        device_map.update({f"model.layers.{i}": (gpu if i < 3 else cpu) for i in range(6)})
        # main_device="cpu": the CPU entries really compute on the CPU (with a GPU main device accelerate
        # would treat them as offloaded weights, streamed to the GPU per call)
        return dispatch_model(seed_model, device_map=device_map, main_device="cpu")

    model = placed(build(tiny_config(), torch.float32, "cpu"))
    plain = placed(build(tiny_config(), torch.float32, "cpu"))
    state = model_state(model)
    if run.dry:  # one device here: declare the first half on a distinct (no-op) device object
        state.runner.layer_devices = [torch.device("cpu", 0)] * 3 + [torch.device("cpu")] * 3
        state.runner.single_device = False
    cfg = GenerationConfig(max_new_tokens=32, method="hybrid", num_skip=2, draft_exit_threshold=0.0)
    same = 0
    for seed in range(3):
        prompt = prompt_of(9 + 2 * seed, 97, seed)
        same += generation(model, None, prompt, cfg).run().token_ids == hf_tokens(plain, prompt, 32)
    kinds = {d.type for d in state.runner.layer_devices}
    if not run.dry and kinds != {"cpu", "cuda"}:
        raise RuntimeError(f"the split model's layers compute on {sorted(kinds)}, not on both the GPU and the CPU")
    return [
        {"check": "split placement (device_map), greedy `hybrid` = `generate`", "result": f"{same}/3"},
        {"check": "runner for the split model", "result": f"{type(state.runner).__name__} on "
         f"{', '.join(sorted({str(d) for d in state.runner.layer_devices}))}"},
    ]  # fmt: skip


# ----------------------------------------------------------------------------- 3. and 4. timings


def call_costs(run: Run, state, num_skip: int) -> list[dict]:
    """Per-call milliseconds through the runner, as a generation calls it."""
    runner = state.runner
    L = runner.num_layers
    cache = runner.new_cache(run.context, 64)
    try:
        prompt = torch.tensor(prompt_of(run.context, runner.vocab_size), device=run.device)
        runner.forward(cache, prompt, 0, last_only=True)
        cache.rollback(run.context)
        one, eight = torch.tensor([5], device=run.device), torch.arange(8, device=run.device)
        keep = [i for i in range(L) if i not in set(every_other_middle(L, num_skip))]
        full = timed(lambda: runner.forward(cache, one, run.context, last_only=True), run.device)
        rows = [{"call": "full step (1 token)", "ms": full}]
        rows.append({
            "call": f"draft step, {num_skip} of {L} layers skipped",
            "ms": timed(lambda: runner.forward(cache, one, run.context, layers=keep, last_only=True), run.device),
        })  # fmt: skip
        for quant in ("int8", "int4"):
            modules, head = draft_modules(state, quant, None)
            runner.prepare(modules)
            rows.append({
                "call": f"draft step, {quant} draft weights",
                "ms": timed(lambda m=modules, h=head: runner.forward(
                    cache, one, run.context, layers=keep, last_only=True, vocab=h, modules=m), run.device),
            })  # fmt: skip
        rows.append(
            {
                "call": "verification of 8 tokens",
                "ms": timed(lambda: runner.forward(cache, eight, run.context), run.device),
            }
        )
        _, hidden = runner.forward(cache, one, run.context, last_only=True, collect_hidden=True)
        rows.append({
            "call": f"layer selection (DP, {num_skip} skipped)",
            "ms": timed(lambda: clasp_dp(hidden[:, 0], num_skip,
                                         lambda i, s: runner.layer_candidates(cache, i - 1, s, run.context)),
                        run.device, 5, 1),
        })  # fmt: skip
    finally:
        runner.release_cache(cache)
    for r in rows:
        r["of a full step"] = round(r["ms"] / full, 3)
        r["ms"] = round(r["ms"], 3)
    return rows


def ours(model, prompt: list[int], cfg: GenerationConfig) -> dict:
    """One warmed generation: prefill and decode apart, accepted tokens."""
    generation(model, None, prompt, cfg).run()  # warm-up with this very configuration
    result = generation(model, None, prompt, cfg).run()
    st = result.stats
    decode = (st.time_total - st.time_prefill) * 1000 / max(1, st.new_tokens - 1)
    return {
        "prefill ms": round(st.time_prefill * 1000, 1),
        "decode ms/token": round(decode, 3),
        "mean accepted tokens": round(st.mean_accepted_tokens, 2),
        "acceptance": f"{st.acceptance_rate:.0%}" if st.drafted else "n/a",
    }


def baseline(model, prompt: list[int], n: int, static: bool, device) -> dict:
    """``generate`` warmed with the ``max_new_tokens`` it is timed with; prefill from a one-token run."""
    hf_tokens(model, prompt, n, static)
    hf_tokens(model, prompt, 1, static)

    def seconds(k: int) -> float:
        sync(device)
        t0 = time.perf_counter()
        hf_tokens(model, prompt, k, static)
        sync(device)
        return time.perf_counter() - t0

    first, total = seconds(1), seconds(n)
    return {
        "prefill ms": round(first * 1000, 1),
        "decode ms/token": round((total - first) * 1000 / (n - 1), 3),
        "mean accepted tokens": 1.0,
        "acceptance": "n/a",
    }


def method_table(run: Run, model, plain, layers: int, skip_hf: bool, methods=None) -> list[dict]:
    vocab = model.config.vocab_size
    prompt = prompt_of(run.context, vocab, 1)
    n = run.new_tokens
    half = layers // 2
    base = GenerationConfig(max_new_tokens=n, num_skip=half, draft_exit_threshold=0.0)
    rows = []
    if not skip_hf:
        rows.append({"method": "`generate`, eager (dynamic cache)", **baseline(plain, prompt, n, False, run.device)})
    configs = methods or {
        "`ar` (graphs)": base.updated(method="ar"),
        f"`clasp`, {half} skipped": base.updated(method="clasp", draft_quant="none"),
        f"`clasp`, {half} skipped, int8 draft": base.updated(method="clasp", draft_quant="int8"),
        f"`clasp`, {half} skipped, int4 draft": base.updated(method="clasp", draft_quant="int4"),
        "`static`, every other middle layer": base.updated(
            method="static", skip_layers=every_other_middle(layers, half), draft_quant="none"
        ),
        "`hybrid`": base.updated(method="hybrid"),
    }
    for label, cfg in configs.items():
        rows.append({"method": label, **ours(model, prompt, cfg)})
    if not skip_hf:  # last: its compilation takes the longest
        rows.insert(
            1, {"method": "`generate`, static cache (compiled)", **baseline(plain, prompt, n, True, run.device)}
        )
    best = min((r["decode ms/token"] for r in rows if r["method"].startswith("`generate`")), default=None)
    for r in rows:
        r["decode speedup vs best `generate`"] = f"{best / r['decode ms/token']:.2f}x" if best else "n/a"
    return rows


def check_big(run: Run, skip_hf: bool) -> list[dict]:
    config = llama_config(run)
    model = build(config, torch.bfloat16, run.device)
    plain = None if skip_hf else build(config, torch.bfloat16, run.device)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    state = use_graphs(model, capacity=run.context + 256)
    rows = call_costs(run, state, config.num_hidden_layers // 2)
    table = method_table(run, model, plain, config.num_hidden_layers, skip_hf)
    bw = next((v for k, v in PEAK_BANDWIDTH.items() if k in run.card), None)
    notes = [
        f"graphs captured inside a round: {state.runner.late_captures}",
        f"weight-bandwidth bound: {weight_bytes / bw * 1000:.2f} ms/token" if bw else "weight-bandwidth bound: n/a",
    ]
    del model, plain, state
    release()
    return [{"costs": rows, "methods": table, "notes": notes}]


def check_deep(run: Run) -> list[dict]:
    config = llama_config(run, layers=80)
    t0 = time.perf_counter()
    model = build(config, torch.bfloat16, run.device)
    built = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters())
    state = use_graphs(model, capacity=run.context + 256)
    half = config.num_hidden_layers // 2
    rows = call_costs(run, state, half)
    cfg = GenerationConfig(max_new_tokens=run.new_tokens, method="clasp", num_skip=half, draft_exit_threshold=0.0)
    table = method_table(run, model, None, config.num_hidden_layers, True, {f"`clasp`, {half} skipped": cfg})
    notes = [f"{config.num_hidden_layers} layers, {params / 1e9:.1f}B parameters, built in {built:.1f} s",
             f"graphs captured inside a round: {state.runner.late_captures}"]  # fmt: skip
    del model, state
    release()
    return [{"costs": rows, "methods": table, "notes": notes}]


# ----------------------------------------------------------------------------- the report


def markdown_table(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    keys = list(rows[0])
    out = ["| " + " | ".join(keys) + " |", "| " + " | ".join("---" for _ in keys) + " |"]
    out += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in rows]
    return out


def report(run: Run, results: list[tuple[str, str, list[dict], float]]) -> str:
    lines = [
        f"# GPU check: {run.card}",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; torch {torch.__version__}; "
        f"{run.context}-token prompt, {run.new_tokens} new tokens, greedy, random weights (bf16 for timings)",
    ]
    for name, status, rows, seconds in results:
        lines += ["", f"## {name} ({status}, {seconds:.0f} s)", ""]
        if rows and "costs" in rows[0]:
            r = rows[0]
            lines += ["Per call:", "", *markdown_table(r["costs"]), "", "End to end:", ""]
            lines += [*markdown_table(r["methods"]), "", *[f"- {n}" for n in r["notes"]]]
        else:
            lines += markdown_table(rows)
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="tiny widths on the CPU, graphs through the stand-in")
    ap.add_argument("--skip-hf", action="store_true", help="skip transformers' baselines (saves the compile)")
    ap.add_argument("--skip-deep", action="store_true", help="skip the 80-layer model")
    a = ap.parse_args()
    dry = a.dry_run or not torch.cuda.is_available()
    if dry:
        os.environ["CLASP_EMULATE_CUDA_GRAPHS"] = "1"  # the graph runner captures through the CPU stand-in
    run = Run(dry)
    checks = [
        ("1. Exactness through captured graphs", lambda: check_tiny(run)),
        ("2. Split placement", lambda: check_split(run)),
        ("3. LLaMA-3-8B shape, 32 layers" if not dry else "3. LLaMA shape (tiny width), 8 layers",
         lambda: check_big(run, a.skip_hf)),
    ]  # fmt: skip
    if not a.skip_deep:
        checks.append(("4. 80 layers" if not dry else "4. Deep (tiny width), 12 layers", lambda: check_deep(run)))
    results, failed = [], 0
    for name, fn in checks:
        t0 = time.perf_counter()
        try:
            rows, status = fn(), "ok"
        except Exception as e:  # one failure never hides the other checks
            traceback.print_exc()
            rows, status = [], f"FAILED: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            failed += 1
        release()
        results.append((name, status, rows, time.perf_counter() - t0))
        print(f"{name}: {status} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    text = report(run, results)
    out = Path(os.environ.get("OUT", "."))
    (out / "gpu_check.md").write_text(text)
    (out / "gpu_check.json").write_text(
        json.dumps([{"check": n, "status": s, "rows": r} for n, s, r, _ in results], indent=1)
    )
    print(text)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
