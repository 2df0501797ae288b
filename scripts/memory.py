#!/usr/bin/env python
"""Peak resident memory of plain ``transformers`` (load, then ``generate``) against clasp-decoding (load,
install, generate with a method), each in a fresh process, on a built-in model (docs/results.md, "Memory").

Also prints what the draft's quantized copies and everything else of ours add, from the process's own
accounting: resident memory after loading, after the first generation, and the bytes of draft copies.

Usage: python scripts/memory.py [--model qwen2.5-coder-0.5b] [--methods ar,clasp,hybrid] [--tokens 32]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")
PROMPT = "Explain what a hash table is and how it handles collisions."

CHILD = r"""
import json, resource, sys, time
import torch

def rss_gb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 2**20
def peak_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

name, method, tokens, prompt = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
from clasp_decoding.fetch import fetch_builtin
folder = fetch_builtin(name, quiet=True)
out = {"method": method}
t0 = time.perf_counter()
if method == "generate":
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    out["loaded_gb"] = rss_gb()
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        model.generate(**ids, max_new_tokens=tokens, do_sample=False)
else:
    import warnings
    warnings.simplefilter("ignore")
    import clasp_decoding
    model, tok = clasp_decoding.load(name)
    out["loaded_gb"] = rss_gb()
    result = clasp_decoding.generate(model, tok, prompt, method=method, max_new_tokens=tokens)
    from clasp_decoding.context import model_state
    from clasp_decoding.quant import extra_bytes
    state = model_state(model)
    draft = [m for key, m in state.learned.items() if isinstance(key, tuple) and str(key[0]).startswith("draft")]
    mods = [x for v in draft for x in (v if isinstance(v, list) else [v])]
    out["draft_copies_gb"] = extra_bytes(mods) / 2**30
out["first_generation_s"] = time.perf_counter() - t0
out["after_gb"] = rss_gb()
out["peak_gb"] = peak_gb()
print(json.dumps(out))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--methods", default="ar,clasp,hybrid")
    ap.add_argument("--tokens", type=int, default=32)
    a = ap.parse_args()
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    rows = []
    for method in ["generate", *a.methods.split(",")]:
        done = subprocess.run(
            [sys.executable, "-c", CHILD, a.model, method, str(a.tokens), PROMPT],
            env=env,
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            sys.exit(f"{method} failed:\n{done.stderr[-3000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    base = rows[0]["peak_gb"]
    print(f"model {a.model}, bf16, {a.tokens} new tokens; peak resident memory of each run in a fresh process")
    print("| run | peak GB | x plain | after load GB | draft copies GB | load + first generation s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        name = "transformers generate" if r["method"] == "generate" else f"clasp-decoding {r['method']}"
        draft = f"{r['draft_copies_gb']:.2f}" if "draft_copies_gb" in r else "-"
        print(
            f"| {name} | {r['peak_gb']:.2f} | {r['peak_gb'] / base:.2f} | {r['loaded_gb']:.2f} | {draft} "
            f"| {r['first_generation_s']:.1f} |"
        )


if __name__ == "__main__":
    main()
