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
        "| method | " + " | ".join(tasks) + f" | overall | tokens/s | acceptance | same as `{summary['reference']}` |",
        "| --- | " + " | ".join("---" for _ in tasks) + " | --- | --- | --- | --- |",
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
            f"| {_fmt(o.get('match_rate'), '{:.0%}', 'n/a (unseeded sampling)')} |"
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
    lines += ["", "## Fidelity", ""]
    ref = summary["reference"]
    if ref is None:
        lines.append(
            "Unseeded sampling: outputs are random, so token-by-token comparison does not apply. Losslessness "
            "under sampling is tested statistically in the test suite; with --seed every method's text is "
            "compared with plain decoding's (`ar`) under the same seed."
        )
    else:
        for label, mism in summary["mismatches"].items():
            if mism:
                where = ", ".join(f"q{m['question_id']} turn {m['turn']} at token {m['position']}" for m in mism[:10])
                lines.append(f"- `{label}`: {len(mism)} turn(s) differ from `{ref}`: {where}")
        if not any(summary["mismatches"].values()):
            what = "greedy" if not info.get("temperature") else f"sampled with seed {info.get('seed')}"
            lines.append(
                f"Every method's output equals `{ref}`'s ({what}), token for token, on every question and turn."
            )
    if summary["failed"]:
        lines += ["", "## Failures", ""]
        for label, fails in summary["failed"].items():
            for f in fails:
                lines.append(f"- `{label}` q{f['question_id']} turn {f['turn']}: {f['error'].splitlines()[0]}")
    return "\n".join(lines) + "\n"


def write_report(out: Path, rows: list[dict], baseline: str, reference: str | None, *, plots: bool = True) -> dict:
    info = json.loads((out / "run.json").read_text()) if (out / "run.json").is_file() else {}
    summary = summarize(rows, baseline, reference)
    summary["run"] = info
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "summary.md").write_text(markdown(summary, info))
    if plots:
        from .plots import make_plots

        summary["plots"] = make_plots(out, rows, summary)
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary
