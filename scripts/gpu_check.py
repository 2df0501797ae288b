#!/usr/bin/env python
"""One prepared check for a GPU machine (no checkpoint reaches it, so models are random, built from configs).

1. Exactness: a tiny fp32 model, greedy CLaSp through the graph runner (CUDA graphs) against
   ``transformers``' greedy generate (reported as a count: the graph runner attends batched, so exact
   equality is expected but not guaranteed at near-ties).
2. Split placement: the same tiny model with half its layers on the GPU and half on the CPU (the eager
   runner, ``device_map``), greedy CLaSp against ``generate``.
3. Timing, LLaMA-3-8B shape, bf16, batch 1, ~1k context: ms per full step, per draft step with 50% of
   layers skipped (plain and with int8 / int4 draft weights), per verification of 8 tokens, per DP run,
   per plain token through the graph runner and through ``transformers``' static-cache compiled
   ``generate``, next to the card's name and the weight-bandwidth bound.
4. Depth: 80 layers at LLaMA-3-8B width (about 17B parameters, ~37 GB in bf16), the DP at 40 skipped
   layers (candidate calls in chunks) and a draft step at 40 kept layers.

Usage:  python scripts/gpu_check.py            (on a GPU machine; about 3-4 minutes)
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
from clasp_decoding.api import generation  # noqa: E402
from clasp_decoding.context import model_state, use_graphs  # noqa: E402
from clasp_decoding.layer_select import clasp_dp, every_other_middle  # noqa: E402
from clasp_decoding.quant import draft_modules, fused_available  # noqa: E402

PEAK_BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12}  # bytes/s, SXM parts


def llama_config(dry: bool, layers: int = 32):
    from transformers import LlamaConfig

    if dry:
        return LlamaConfig(
            vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        )  # fmt: skip
    return LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
    )  # fmt: skip


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


def tokens(model, prompt, cfg) -> list[int]:
    return generation(model, None, prompt, cfg).run().token_ids


def tiny(device):
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512,
    )  # fmt: skip
    torch.manual_seed(0)
    return build(config, torch.float32, device)


def reference(model, prompt, device) -> list[int]:
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([prompt], device=device), max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    return out[0, len(prompt) :].tolist()


def check_tiny(device, capture) -> dict:
    model = tiny(device)
    use_graphs(model, capacity=256, capture=capture)
    cfg = GenerationConfig(max_new_tokens=32, method="clasp", num_skip=2, draft_exit_threshold=0.0)
    same = 0
    for seed in range(4):
        prompt = torch.randint(3, 97, (8 + 3 * seed,), generator=torch.Generator().manual_seed(seed)).tolist()
        same += tokens(model, prompt, cfg) == reference(model, prompt, device)
    return {"tiny_fp32_graph_identical": f"{same}/4"}


def check_split(device) -> dict:
    """Layers 0-2 on ``device``, 3-5 and the head on the CPU (or a dry run's stand-in device object)."""
    model = tiny("cpu")
    if device.type == "cuda":
        for layer in model.model.layers[:3]:
            layer.to(device)
        model.model.embed_tokens.to(device)
        model.model.rotary_emb.to(device)
    state = model_state(model)
    if device.type != "cuda":  # dry run: declare the first half on a distinct (no-op) device object
        state.runner.layer_devices = [torch.device("cpu", 0)] * 3 + [torch.device("cpu")] * 3
        state.runner.single_device = False
    cfg = GenerationConfig(max_new_tokens=32, method="hybrid", num_skip=2, draft_exit_threshold=0.0)
    same = 0
    for seed in range(3):
        prompt = torch.randint(3, 97, (9 + 2 * seed,), generator=torch.Generator().manual_seed(seed)).tolist()
        same += tokens(model, prompt, cfg) == reference(model, prompt, "cpu")
    return {
        "split_gpu_cpu_identical": f"{same}/3",
        "split_devices": sorted({str(d) for d in state.runner.layer_devices}),
    }


def step_timings(runner, device, context: int, num_skip: int, state) -> dict:
    L = runner.num_layers
    cache = runner.new_cache(context, 64)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, runner.vocab_size, (context,), generator=g).to(device)
    t0 = time.perf_counter()
    runner.forward(cache, prompt, 0, last_only=True)
    sync(device)
    prefill = (time.perf_counter() - t0) * 1000
    cache.rollback(context)
    one, eight = torch.tensor([5], device=device), torch.arange(8, device=device)
    keep = [i for i in range(L) if i not in set(every_other_middle(L, num_skip))]
    out = {"prefill_ms": round(prefill, 1)}
    out["full_step_ms"] = full = timed(lambda: runner.forward(cache, one, context, last_only=True), device)
    out["draft_step_ms"] = timed(lambda: runner.forward(cache, one, context, layers=keep, last_only=True), device)
    for quant in ("int8", "int4"):
        modules, head = draft_modules(state, quant, None)
        ms = timed(
            lambda m=modules, h=head: runner.forward(
                cache, one, context, layers=keep, last_only=True, vocab=h, modules=m
            ),
            device,
        )
        out[f"draft_step_{quant}_ms"] = ms
        out[f"{quant}_fused_kernel"] = fused_available(quant, device.type)
    out["verify_8_ms"] = timed(lambda: runner.forward(cache, eight, context), device)
    _, hidden = runner.forward(cache, one, context, last_only=True, collect_hidden=True)
    out["dp_run_ms"] = timed(
        lambda: clasp_dp(hidden[:, 0], num_skip, lambda i, s: runner.layer_candidates(cache, i - 1, s, context)),
        device,
        5,
        1,
    )
    runner.release_cache(cache)
    out["ratios"] = {
        k.removesuffix("_ms") + "/full": round(v / full, 3)
        for k, v in out.items()
        if k.endswith("_ms") and k != "full_step_ms" and k != "prefill_ms"
    }
    return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in out.items()}


def check_big(device, dry, capture, compile_layers, skip_hf) -> dict:
    config = llama_config(dry)
    torch.manual_seed(0)
    model = build(config, torch.bfloat16, device)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    context = 256 if dry else 1024
    state = use_graphs(model, capacity=context + 512, capture=capture, compile_layers=compile_layers)
    out = step_timings(state.runner, device, context, config.num_hidden_layers // 2, state)
    prompt = torch.randint(0, config.vocab_size, (context,)).tolist()
    n_new = 16 if dry else 64
    cfg = GenerationConfig(max_new_tokens=n_new, method="ar")
    tokens(model, prompt, cfg.updated(max_new_tokens=4))
    for method in ("ar", "clasp"):
        sync(device)
        t0 = time.perf_counter()
        got = tokens(model, prompt, cfg.updated(method=method, skip_ratio=0.5))
        sync(device)
        out[f"{method}_ms_per_token"] = round((time.perf_counter() - t0) * 1000 / len(got), 3)
    if not skip_hf:
        ids = torch.tensor([prompt], device=device)
        kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0, cache_implementation="static")
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=8, min_new_tokens=8, **kw)  # compiles
            sync(device)
            t0 = time.perf_counter()
            model.generate(ids, max_new_tokens=n_new, min_new_tokens=n_new, **kw)
            sync(device)
        out["hf_static_compiled_ms_per_token"] = round((time.perf_counter() - t0) * 1000 / n_new, 3)
    card = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu (dry run)"
    bw = next((v for k, v in PEAK_BANDWIDTH.items() if k in card), None)
    out["bandwidth_bound_ms"] = round(weight_bytes / bw * 1000, 3) if bw else None
    del model, state
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {
        "card": card,
        "model": "LLaMA-3-8B shape" if not dry else "tiny LLaMA shape (dry run)",
        "dtype": "bf16",
        "context": context,
        **out,
    }


def check_deep(device, dry, capture) -> dict:
    """80 layers at LLaMA-3-8B width: the DP at 40 skipped layers sends up to 40 candidates per layer."""
    config = llama_config(dry, layers=80)
    t0 = time.perf_counter()
    model = build(config, torch.bfloat16, device)
    built = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters())
    state = use_graphs(model, capacity=1024, capture=capture)
    timings = step_timings(state.runner, device, 256 if dry else 512, config.num_hidden_layers // 2, state)
    del model, state
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {
        "deep_layers": config.num_hidden_layers,
        "deep_params_b": round(params / 1e9, 2),
        "deep_build_s": round(built, 1),
        "deep": timings,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="tiny configs, no CUDA graphs: check the script anywhere")
    ap.add_argument("--compile", action="store_true", help="torch.compile each layer before capture (slower start)")
    ap.add_argument("--skip-hf", action="store_true", help="skip transformers' compiled generate (saves its compile)")
    ap.add_argument("--skip-deep", action="store_true", help="skip the 80-layer model")
    a = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not a.dry_run else "cpu")
    capture = device.type == "cuda"
    dry = a.dry_run or device.type != "cuda"
    t0 = time.perf_counter()
    out = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__}
    out.update(check_tiny(device, capture))
    out.update(check_split(device))
    out.update(check_big(device, dry, capture, a.compile, a.skip_hf))
    if not a.skip_deep:
        out.update(check_deep(device, dry, capture))
    out["total_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(out, indent=1))
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_check.json").write_text(json.dumps(out, indent=1))
    return 0 if out["split_gpu_cpu_identical"] == "3/3" else 1


if __name__ == "__main__":
    sys.exit(main())
