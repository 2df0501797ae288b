"""Writing a benchmark's results: summary.json, summary.md and the plots."""

from __future__ import annotations

import json
from pathlib import Path

from .metrics import summarize
from .suite import TASKS


def _fmt(value, pattern: str = "{:.2f}", none: str = "n/a") -> str:
    return none if value is None else pattern.format(value)


def markdown(summary: dict, info: dict) -> str:
    """The tables a reader wants: speedup and mean accepted tokens per task, then fidelity."""
    methods = summary["methods"]
    tasks = [t for t in TASKS if any(t in m["tasks"] for m in methods.values())]
    machine = info.get("machine", {})
    lines = [
        f"# Benchmark: {info.get('model')}",
        "",
        f"- questions: {info.get('questions')} (per task: {info.get('per_task') or 'all'}), "
        f"max new tokens {info.get('max_new_tokens')}, temperature {info.get('temperature')}, "
        f"dtype {info.get('dtype')}, repeats {info.get('repeats')}",
        f"- machine: {machine.get('cpu')} ({machine.get('torch_threads')} threads"
        + (f", GPU {machine['gpu']}" if machine.get("gpu") else "")
        + f"), torch {machine.get('torch')}, "
        f"transformers {machine.get('transformers')}; started {info.get('started')}",
        f"- baseline: `{summary['baseline']}`; speedup = mean tokens/s over questions / the baseline's, same run",
        "",
        "## Speedup over the baseline (mean accepted tokens)",
        "",
        "| method | " + " | ".join(tasks) + " | overall | tokens/s | acceptance | same as `ar` | same as `generate` |",
        "| --- | " + " | ".join("---" for _ in tasks) + " | --- | --- | --- | --- | --- |",
    ]
    for label, res in methods.items():
        cells = []
        for t in tasks:
            e = res["tasks"].get(t)
            cells.append("" if e is None else f"{_fmt(e['speedup'], '{:.2f}x')} ({_fmt(e['mean_accepted_tokens'])})")
        o = res["overall"]
        spread = ""
        if "speedup_min" in o:
            spread = f" [{o['speedup_min']:.2f}-{o['speedup_max']:.2f}]"
        lines.append(
            f"| `{label}` | "
            + " | ".join(cells)
            + f" | **{_fmt(o['speedup'], '{:.2f}x')}**{spread} ({_fmt(o['mean_accepted_tokens'])}) "
            f"| {o['tokens_per_second']:.2f} | {_fmt(o['acceptance_rate'], '{:.0%}')} "
            f"| {_fmt(o.get('match_rate'), '{:.0%}')} | {_fmt(o.get('generate_rate'), '{:.0%}')} |"
        )
    split_rows = [
        (label, res["overall"]["time_fraction"]) for label, res in methods.items() if "time_fraction" in res["overall"]
    ]
    if split_rows:
        lines += [
            "",
            "## Where the time goes (fraction of wall time)",
            "",
            "| method | prefill | draft | verify | layer selection | other |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for label, f in split_rows:
            lines.append(
                f"| `{label}` | "
                + " | ".join(f"{f[k]:.1%}" for k in ("prefill", "draft", "verify", "layer_selection", "other"))
                + " |"
            )
    lines += ["", "## Fidelity", "", *_fidelity_lines(summary, info)]
    if summary["failed"]:
        lines += ["", "## Failures", ""]
        for label, fails in summary["failed"].items():
            for f in fails:
                lines.append(f"- `{label}` q{f['question_id']} turn {f['turn']}: {f['error'].splitlines()[0]}")
    return "\n".join(lines) + "\n"


def _fidelity_lines(summary: dict, info: dict) -> list[str]:
    """What each fidelity column compares, and every turn that differs from the exact reference."""
    exact, plain = summary["references"].get("exact"), summary["references"].get("generate")
    what = "greedy" if not info.get("temperature") else f"sampled with seed {info.get('seed')}"
    lines = []
    if exact is None:
        lines.append(
            "`same as ar` is n/a: "
            + (
                "unseeded sampling gives random outputs (losslessness under sampling is tested statistically)."
                if info.get("temperature") and info.get("seed") is None
                else "plain decoding (`ar`) was not among the methods."
            )
        )
    else:
        for label, mism in summary["mismatches"].items():
            if mism:
                where = ", ".join(f"q{m['question_id']} turn {m['turn']} at token {m['position']}" for m in mism[:10])
                lines.append(f"- `{label}`: {len(mism)} turn(s) differ from `{exact}`: {where}")
        if not any(summary["mismatches"].values()):
            lines.append(
                f"`same as ar`: every method's output equals plain decoding's through the same numerics (`{exact}`, "
                f"{what}), token for token, on every question and turn."
            )
    if plain is None:
        lines.append(
            "`same as generate` is n/a: "
            + (
                "`generate` draws its own random numbers when sampling."
                if info.get("temperature")
                else "`hf` (transformers' generate on an untouched copy of the model) was not among the methods."
            )
        )
    else:
        rates = [
            f"`{label}` {res['overall']['generate_rate']:.0%}"
            for label, res in summary["methods"].items()
            if res["overall"].get("generate_rate") is not None and label != plain
        ]
        lines.append(
            f"`same as generate`: share of turns equal to `transformers`' `generate` on an untouched copy of the "
            f"model (`{plain}`), which computes with torch's kernels: {', '.join(rates)}. A difference there is "
            "two tokens within rounding of each other, decided the other way by other kernels (docs/numerics.md)."
        )
    return lines


def write_report(
    out: Path, rows: list[dict], baseline: str, references: dict[str, str | None], *, plots: bool = True
) -> dict:
    info = json.loads((out / "run.json").read_text()) if (out / "run.json").is_file() else {}
    summary = summarize(rows, baseline, references)
    summary["run"] = info
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "summary.md").write_text(markdown(summary, info))
    if plots:
        from .plots import make_plots

        summary["plots"] = make_plots(out, rows, summary)
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary
