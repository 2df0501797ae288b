#!/usr/bin/env python
"""One prepared check for a GPU machine (no checkpoint reaches it, so models are random, built from configs).

1. Exactness: a tiny fp32 model, greedy CLaSp through the graph runner (CUDA graphs) against
   ``transformers``' greedy generate: must be identical. A LLaMA-3-8B-shaped bf16 model: CLaSp against
   plain decoding through the same graph runner: the match rate is reported (bf16 GPU kernels are not
   batch-invariant, so rare near-tie flips are possible).
2. Timing, LLaMA-3-8B shape, bf16, batch 1, ~1k context: ms per full step (1 token), per draft step
   with 50% of layers skipped, per verification of 8 tokens, per DP run, per plain token through the
   graph runner (``ar``) and through ``transformers``' static-cache compiled generate (``hf``), next to
   the card's name and the weight-bandwidth bound.

Usage:  python scripts/gpu_check.py            (on a GPU machine; about 3 minutes)
        python scripts/gpu_check.py --dry-run  (anywhere: tiny configs, capture off; checks the script)
Writes a JSON copy of the table to $OUT/gpu_check.json when OUT is set.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from clasp_decoding import GenerationConfig  # noqa: E402
from clasp_decoding.api import use_graphs  # noqa: E402
from clasp_decoding.decoding import decode, start_session  # noqa: E402
from clasp_decoding.layer_select import clasp_dp, every_other_middle  # noqa: E402

PEAK_BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12}  # bytes/s, SXM parts


def llama_config(dry: bool):
    from transformers import LlamaConfig

    if dry:
        return LlamaConfig(
            vocab_size=512,
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=8,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=2048,
        )
    return LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rope_theta=500000.0,
    )


def build(config, dtype, device):
    from transformers import AutoModelForCausalLM

    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeat=20, warm=3) -> float:
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


def greedy_tokens(model, runner, prompt, cfg):
    s = start_session(runner, prompt, cfg, set())
    return [t for chunk in decode(runner, prompt, cfg, set(), None, s) for t in chunk]


def check_tiny(device, capture) -> dict:
    from transformers import LlamaConfig

    cfg_model = LlamaConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    model = build(cfg_model, torch.float32, device)
    runner = use_graphs(model, capacity=256, capture=capture)
    same = 0
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        prompt = torch.randint(3, 97, (8 + 3 * seed,), generator=g).tolist()
        with torch.inference_mode():
            ref = model.generate(
                torch.tensor([prompt], device=device),
                max_new_tokens=32,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )[0, len(prompt) :].tolist()
        cfg = GenerationConfig(max_new_tokens=32, method="clasp", num_skip=2, draft_exit_threshold=0.0)
        same += greedy_tokens(model, runner, prompt, cfg) == ref
    return {"tiny_fp32_identical": f"{same}/4"}


def check_big(device, dry, capture, compile_layers, skip_hf) -> dict:
    dtype = torch.bfloat16
    config = llama_config(dry)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = build(config, dtype, device)
    build_s = time.perf_counter() - t0
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    context = 256 if dry else 1024
    runner = use_graphs(model, capacity=context + 512, capture=capture, compile_layers=compile_layers)
    L = runner.num_layers
    prompt = torch.randint(0, config.vocab_size, (context,)).tolist()
    cache = runner.new_cache(context + 64)
    t0 = time.perf_counter()
    runner.forward(cache, torch.tensor(prompt, device=device), 0, last_only=True)
    sync(device)
    prefill_ms = (time.perf_counter() - t0) * 1000
    cache.rollback(context)
    one = torch.tensor([5], device=device)
    eight = torch.arange(8, device=device)
    keep = [i for i in range(L) if i not in set(every_other_middle(L, L // 2))]
    t0 = time.perf_counter()
    full = timed(lambda: runner.forward(cache, one, context, last_only=True), device)
    draft = timed(lambda: runner.forward(cache, one, context, layers=keep, last_only=True), device)
    verify8 = timed(lambda: runner.forward(cache, eight, context), device)
    _, hidden = runner.forward(cache, one, context, last_only=True, collect_hidden=True)
    dp = timed(
        lambda: clasp_dp(hidden[:, 0], L // 2, lambda i, s: runner.layer_candidates(cache, i - 1, s, context)),
        device,
        repeat=5,
        warm=1,
    )
    capture_s = time.perf_counter() - t0
    # Plain decoding through the graph runner (the loop included), and transformers' compiled generate.
    n_new = 16 if dry else 64
    cfg = GenerationConfig(max_new_tokens=n_new, method="ar")
    greedy_tokens(model, runner, prompt, cfg.updated(max_new_tokens=4))
    sync(device)
    t0 = time.perf_counter()
    ar_tokens = greedy_tokens(model, runner, prompt, cfg)
    sync(device)
    ar_ms = (time.perf_counter() - t0) * 1000 / len(ar_tokens)
    t0 = time.perf_counter()
    clasp_tokens = greedy_tokens(model, runner, prompt, cfg.updated(method="clasp", skip_ratio=0.5))
    sync(device)
    clasp_ms = (time.perf_counter() - t0) * 1000 / len(clasp_tokens)
    match = sum(a == b for a, b in zip(ar_tokens, clasp_tokens, strict=False)) / len(ar_tokens)
    hf_ms = None
    if not skip_hf:
        ids = torch.tensor([prompt], device=device)
        kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0, cache_implementation="static")
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=8, min_new_tokens=8, **kw)  # compiles
            sync(device)
            t0 = time.perf_counter()
            model.generate(ids, max_new_tokens=n_new, min_new_tokens=n_new, **kw)
            sync(device)
        hf_ms = (time.perf_counter() - t0) * 1000 / n_new
    card = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu (dry run)"
    bw = next((v for k, v in PEAK_BANDWIDTH.items() if k in card), None)
    bound = weight_bytes / bw * 1000 if bw else None
    return {
        "card": card,
        "model": "LLaMA-3-8B shape" if not dry else "tiny LLaMA shape (dry run)",
        "dtype": "bf16",
        "context": context,
        "build_s": round(build_s, 1),
        "prefill_ms": round(prefill_ms, 1),
        "capture_and_timing_s": round(capture_s, 1),
        "full_step_ms": round(full, 3),
        "draft_step_50pct_ms": round(draft, 3),
        "verify_8_ms": round(verify8, 3),
        "dp_run_ms": round(dp, 3),
        "ar_ms_per_token": round(ar_ms, 3),
        "clasp_ms_per_token_random_weights": round(clasp_ms, 3),
        "hf_static_compiled_ms_per_token": None if hf_ms is None else round(hf_ms, 3),
        "bandwidth_bound_ms": None if bound is None else round(bound, 3),
        "ratios": {
            "draft/full": round(draft / full, 3),
            "verify8/full": round(verify8 / full, 3),
            "dp/full": round(dp / full, 3),
            "full/bound": None if bound is None else round(full / bound, 3),
        },
        "greedy_match_bf16_clasp_vs_ar": round(match, 4),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="tiny configs, no CUDA graphs: check the script anywhere")
    ap.add_argument("--compile", action="store_true", help="torch.compile each layer before capture (slower start)")
    ap.add_argument("--skip-hf", action="store_true", help="skip transformers' compiled generate (saves its compile)")
    a = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not a.dry_run else "cpu")
    capture = device.type == "cuda"
    t0 = time.perf_counter()
    out = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__}
    out.update(check_tiny(device, capture))
    out.update(check_big(device, a.dry_run or device.type != "cuda", capture, a.compile, a.skip_hf))
    out["total_s"] = round(time.perf_counter() - t0, 1)
    width = max(len(k) for k in out)
    for k, v in out.items():
        print(f"{k:<{width}}  {v}")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_check.json").write_text(json.dumps(out, indent=1))
    return 0 if out["tiny_fp32_identical"] == "4/4" else 1


if __name__ == "__main__":
    sys.exit(main())
