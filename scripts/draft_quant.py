#!/usr/bin/env python
"""CLaSp with each draft quantization on the built-in prompts: mean accepted tokens, draft acceptance and
tokens/s, the figures behind ``draft_quant="auto"`` (docs/tuning.md).

Usage: python scripts/draft_quant.py [--model qwen2.5-coder-1.5b] [--tokens 48]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from clasp_decoding import generate, load  # noqa: E402
from clasp_decoding.bench.suite import builtin_questions  # noqa: E402
from clasp_decoding.text import encode_prompt  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-coder-1.5b")
    ap.add_argument("--tokens", type=int, default=48)
    args = ap.parse_args()
    model, tok = load(args.model, quiet=True)
    prompts = [encode_prompt(tok, q.turns[0]) for q in builtin_questions()[::2]]
    print("| draft_quant | mean accepted tokens | draft acceptance | tokens/s |\n| --- | --- | --- | --- |")
    for quant in ("none", "int4", "int8"):
        tokens = steps = drafted = accepted = 0
        seconds = 0.0
        for ids in prompts:
            st = generate(model, tok, ids, max_new_tokens=args.tokens, method="clasp", draft_quant=quant).stats
            tokens, steps, seconds = tokens + st.new_tokens, steps + st.steps, seconds + st.time_total
            drafted, accepted = drafted + st.drafted, accepted + st.accepted
        print(f"| {quant} | {tokens / steps:.2f} | {accepted / drafted:.0%} | {tokens / seconds:.2f} |", flush=True)


if __name__ == "__main__":
    main()
