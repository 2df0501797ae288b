#!/usr/bin/env python
"""Which plain-decoding configuration is fastest here: `transformers`' `generate` on a built-in model in
fp32 and bf16, with stock kernels and with the project's numerics installed, dynamic and static cache.

Usage: python scripts/baseline_dtypes.py [--model qwen2.5-coder-1.5b] [--tokens 64]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from clasp_decoding import numerics  # noqa: E402
from clasp_decoding.fetch import BUILTIN_MODELS, fetch_builtin  # noqa: E402
from clasp_decoding.text import encode_prompt  # noqa: E402

PROMPTS = [
    "Explain what a hash table is and how it handles collisions.",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
]


def tokens_per_second(model, tok, tokens: int, **gen) -> float:
    total_t = total_n = 0.0
    for i, prompt in enumerate([PROMPTS[0], *PROMPTS]):  # the first run warms up
        ids = torch.tensor([encode_prompt(tok, prompt)])
        t0 = time.perf_counter()
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            do_sample=False,
            **gen,
        )
        if i:
            total_t += time.perf_counter() - t0
            total_n += out.shape[1] - ids.shape[1]
    return total_n / total_t


def main() -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-1.5b", choices=sorted(BUILTIN_MODELS))
    ap.add_argument("--tokens", type=int, default=64)
    a = ap.parse_args()
    folder = fetch_builtin(a.model, quiet=True)
    tok = AutoTokenizer.from_pretrained(folder)
    print(f"{a.model}, {a.tokens} new tokens, torch {torch.__version__}, {torch.get_num_threads()} threads")
    for dtype, patched, cache in (
        (torch.float32, False, "dynamic"),
        (torch.bfloat16, False, "dynamic"),
        (torch.bfloat16, True, "dynamic"),
        (torch.bfloat16, True, "static"),
    ):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
        if patched:
            numerics.install(model)
        gen = {"cache_implementation": "static", "disable_compile": True} if cache == "static" else {}
        with torch.inference_mode():
            tps = tokens_per_second(model, tok, a.tokens, **gen)
        label = (
            f"{str(dtype).removeprefix('torch.')}, {'project numerics' if patched else 'stock kernels'}, {cache} cache"
        )
        print(f"{label:<50} {tps:6.2f} tok/s  {1000 / tps:6.1f} ms/token", flush=True)
        del model
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
