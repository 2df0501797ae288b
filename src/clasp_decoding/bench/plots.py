"""Benchmark plots (PNG): speedup per task, CLaSp's skip sets over one generation, accepted lengths."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..drafting.registry import METHODS
from .suite import TASKS  # noqa: E402


def speedup_per_task(path: Path, summary: dict) -> None:
    methods = [m for m in summary["methods"] if m != summary["baseline"]]
    tasks = [t for t in TASKS if any(t in summary["methods"][m]["tasks"] for m in methods)] + ["overall"]
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(tasks) * max(1, len(methods)) / 2), 4))
    width = 0.8 / max(1, len(methods))
    for i, m in enumerate(methods):
        res = summary["methods"][m]
        values = [(res["overall"] if t == "overall" else res["tasks"].get(t, {})).get("speedup") or 0.0 for t in tasks]
        ax.bar([j + i * width for j in range(len(tasks))], values, width, label=m)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([j + width * (len(methods) - 1) / 2 for j in range(len(tasks))])
    ax.set_xticklabels(tasks, rotation=20)
    ax.set_ylabel(f"speedup over {summary['baseline']}")
    ax.legend(fontsize=8)
    ax.set_title("Speedup per task")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def skip_heatmap(path: Path, row: dict, num_layers: int | None = None) -> None:
    """Layer index against DP update: which layers the draft skipped after each layer selection."""
    sets = row["skip_sets"]
    n = num_layers or (max((max(s[1]) for s in sets if s[1]), default=0) + 1)
    grid = [[1.0 if layer in set(layers) else 0.0 for _, layers in sets] for layer in range(n)]
    fig, ax = plt.subplots(figsize=(max(5, 0.25 * len(sets) + 2), 0.18 * n + 1.5))
    ax.imshow(grid, aspect="auto", cmap="Greys", interpolation="nearest", origin="lower")
    ax.set_xlabel("layer selection (verification step at which it took effect)")
    ticks = list(range(0, len(sets), max(1, len(sets) // 10)))
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(sets[i][0]) for i in ticks])
    ax.set_ylabel("layer (dark = skipped)")
    ax.set_title(f"Skip sets over one generation (question {row['question_id']}, {row['new_tokens']} tokens)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def accepted_lengths(path: Path, rows: list[dict]) -> None:
    counts: dict[str, Counter] = {}
    for r in rows:
        if r["status"] == "ok" and r.get("accepted_lengths"):
            counts.setdefault(r["method"], Counter()).update(r["accepted_lengths"])
    fig, ax = plt.subplots(figsize=(7, 4))
    for m, c in counts.items():
        total = sum(c.values())
        xs = sorted(c)
        ax.plot([x + 1 for x in xs], [c[x] / total for x in xs], marker="o", label=m)
    ax.set_xlabel("tokens per verification step (accepted drafts + 1)")
    ax.set_ylabel("fraction of steps")
    ax.set_title("Accepted lengths")
    if counts:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def make_plots(out: Path, rows: list[dict], summary: dict) -> list[str]:
    made = []
    speedup_per_task(out / "speedup_per_task.png", summary)
    made.append("speedup_per_task.png")
    accepted_lengths(out / "accepted_lengths.png", rows)
    made.append("accepted_lengths.png")
    clasp_rows = [
        r
        for r in rows
        if r["status"] == "ok" and r.get("kind") in METHODS and METHODS[r["kind"]].layer_skip and r.get("skip_sets")
    ]
    if clasp_rows:
        longest = max(clasp_rows, key=lambda r: (len(r["skip_sets"]), r["new_tokens"]))
        skip_heatmap(out / "clasp_skip_sets.png", longest, summary.get("run", {}).get("num_layers"))
        made.append("clasp_skip_sets.png")
    return made
