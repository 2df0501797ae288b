"""``clasp bench``: Spec-Bench-compatible benchmark of every decoding method in one process."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..fetch import DEFAULT_MODEL

DEFAULT_METHODS = "ar,hf,clasp,pld,hybrid"


def add_bench_parser(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="benchmark methods on Spec-Bench questions (or a built-in suite)",
        description="Runs every method on every question, interleaved, in one process; writes records.jsonl, "
        "summary.json, summary.md and plots to --out. Re-running with the same --out resumes.",
    )
    p.add_argument("--model", "-m", default=DEFAULT_MODEL)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="cpu")
    p.add_argument("--questions", default=None, help="Spec-Bench question.jsonl (default: the built-in suite)")
    p.add_argument(
        "--methods",
        default=DEFAULT_METHODS,
        help="comma-separated: ar, hf, llamacpp, clasp, static, pld, hybrid; options in brackets, "
        "e.g. 'clasp[num_skip=8,draft_exit_threshold=0.8]' (llamacpp needs the [peers] extra)",
    )
    p.add_argument("--per-task", type=int, default=None, help="questions per task (default: all)")
    p.add_argument("--tasks", default=None, help="comma-separated subset of the six tasks")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None, help="sampling seed (per question: seed + 1000 * index)")
    p.add_argument("--repeats", type=int, default=1, help="run everything N times to see the spread")
    p.add_argument("--baseline", default="hf", help="method label the speedups are relative to (default: hf)")
    p.add_argument("--out", default="results/bench", help="output folder (resumes if it holds this run)")
    p.add_argument("--no-warmup", action="store_true")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--static-budget", type=int, default=14, help="skip sets the static search may try")
    p.set_defaults(func=cmd_bench)


def fidelity_references(methods, a: argparse.Namespace) -> dict[str, str | None]:
    """What texts are compared with: ``exact``, plain decoding through the engine (``ar``; greedy, or the
    same seed: every method must equal it); ``generate``, transformers' generate on an untouched copy
    (``hf``; greedy only: it draws its own random numbers when sampling)."""
    from ..sampling import GREEDY_BELOW

    greedy = a.temperature < GREEDY_BELOW
    plain = [m.label for m in methods if m.kind == "ar" and not m.overrides]
    hf = [m.label for m in methods if m.kind == "hf" and not m.overrides]
    return {
        "exact": plain[0] if plain and (greedy or a.seed is not None) else None,
        "generate": hf[0] if hf and greedy else None,
    }


def _usable_peers(methods, a: argparse.Namespace):
    """Drop ``llamacpp`` (saying why) where it cannot run: llama-cpp-python absent, or sampling (its random
    numbers are its own: no text to compare, and greedy is the comparison the peer figures are about)."""
    from .llamacpp import available

    keep = []
    for m in methods:
        if m.kind == "llamacpp":
            why = available() or ("it runs greedy only" if a.temperature > 0 else None)
            if why:
                print(f"Skipping llamacpp: {why}.", file=sys.stderr)
                continue
        keep.append(m)
    return keep


def _peers(methods, a: argparse.Namespace, model) -> dict:
    """What the peer methods run on, made before the engine touches the model."""
    peers: dict = {}
    if any(m.kind == "hf" for m in methods):  # the generate users have
        from ..baselines import pristine_copy

        peers["hf"] = pristine_copy(model)
    if any(m.kind == "llamacpp" for m in methods):
        import torch

        from .llamacpp import LlamaCpp

        peers["llamacpp"] = LlamaCpp(a.model, torch.get_num_threads())
    return peers


def cmd_bench(a: argparse.Namespace) -> int:
    from ..config import GenerationConfig
    from ..errors import ConfigError
    from ..models import load
    from .methods import parse_methods
    from .report import write_report
    from .run import BenchSettings, run_benchmark
    from .suite import BenchInputError, builtin_questions, load_questions, select

    # Everything that can be checked before loading a model is checked first.
    methods = _usable_peers(parse_methods(a.methods), a)
    labels = [m.label for m in methods]
    if a.baseline not in labels:
        raise BenchInputError(f"--baseline {a.baseline!r} is not among --methods ({', '.join(labels)}).")
    if a.repeats < 1:
        raise BenchInputError("--repeats must be at least 1.")
    try:
        GenerationConfig(
            max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k, seed=a.seed
        )
    except ConfigError as e:
        raise BenchInputError(str(e)) from None
    tasks = [t.strip() for t in a.tasks.split(",")] if a.tasks else None
    questions = load_questions(a.questions) if a.questions else builtin_questions()
    questions = select(questions, a.per_task, tasks)
    out = Path(a.out)
    settings = BenchSettings(
        model=a.model,
        methods=methods,
        questions=questions,
        out=out,
        dtype=a.dtype,
        device=a.device,
        max_new_tokens=a.max_new_tokens,
        temperature=a.temperature,
        top_p=a.top_p,
        top_k=a.top_k,
        seed=a.seed,
        repeats=a.repeats,
        baseline=a.baseline,
        warmup=not a.no_warmup,
        questions_source=str(a.questions) if a.questions else "built-in",
        per_task=a.per_task,
        tasks=tasks,
    )
    model, tokenizer = load(a.model, dtype=a.dtype, device=a.device)
    peers = _peers(methods, a, model)
    print(f"{len(questions)} questions x {len(methods)} methods x {a.repeats} repeat(s) -> {out}", file=sys.stderr)
    extra = {"num_layers": model.config.num_hidden_layers, "dtype_resolved": str(model.dtype).replace("torch.", "")}
    static_note = None
    for i, spec in enumerate(methods):
        if spec.kind == "static" and "skip_layers" not in dict(spec.overrides):
            from .static import find_static_skip

            def report(n, budget, skip, tps):
                print(f"  static search {n}/{budget}: skip {list(skip)} -> {tps:.2f} tok/s", file=sys.stderr)

            print("Searching the static skip set (cached per model once found) ...", file=sys.stderr)
            found = find_static_skip(
                model, tokenizer, settings.generation_config(), budget=a.static_budget, progress=report
            )
            static_note = found.to_dict()
            methods[i] = type(spec)(spec.label, spec.kind, spec.overrides + (("skip_layers", found.skip_layers),))
            print(
                f"static skip set: {list(found.skip_layers)} ({found.search_seconds:.0f} s of search, "
                f"{found.evaluations} sets tried)",
                file=sys.stderr,
            )
    settings.methods = methods
    rows = run_benchmark(settings, model, tokenizer, log=lambda s: print(s, file=sys.stderr), peers=peers)
    info = json.loads((out / "run.json").read_text())
    info.update(extra)
    if static_note:
        info["static_search"] = static_note
    (out / "run.json").write_text(json.dumps(info, indent=1))
    summary = write_report(out, rows, a.baseline, fidelity_references(methods, a), plots=not a.no_plots)
    print((out / "summary.md").read_text())
    return 0 if not summary["failed"] else 1
