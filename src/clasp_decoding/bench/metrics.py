"""Spec-Bench's arithmetic on benchmark records, and the fidelity check.

Per question, tokens/s = new tokens over all turns / wall time over all turns. A method's speedup over
the baseline = mean over questions of its tokens/s / the same mean for the baseline, on the questions
both completed. Mean accepted tokens = new tokens / full-model steps. Every method counts tokens the
same way: the token ids it returned.
"""

from __future__ import annotations

import statistics
from collections import defaultdict

from .suite import TASKS

_TIME_KEYS = ("prefill", "draft", "verify", "layer_selection", "other")


def first_divergence(a: list[int], b: list[int]) -> int | None:
    """Index of the first differing token, or the shorter length if one is a prefix; ``None`` if equal."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def _questions(rows: list[dict]) -> dict[tuple[str, str, int], dict]:
    """Complete, successful (method, question, repeat) groups, their turns summed."""
    groups: dict[tuple[str, str, int], list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["method"], str(r["question_id"]), r["repeat"])].append(r)
    out = {}
    for key, group in groups.items():
        if any(r["status"] != "ok" for r in group):
            continue
        group.sort(key=lambda r: r["turn"])
        split = defaultdict(float)
        for r in group:
            for k, v in (r.get("time_split") or {}).items():
                split[k] += v
        out[key] = {
            "task": group[0]["task"],
            "tokens": sum(r["new_tokens"] for r in group),
            "seconds": sum(r["seconds"] for r in group),
            "steps": sum(r["steps"] for r in group),
            "drafted": sum(r.get("drafted", 0) for r in group),
            "accepted": sum(r.get("accepted", 0) for r in group),
            "outputs": [r["output_ids"] for r in group],
            "split": dict(split),
        }
    return out


def _stats(
    entries: list[dict], base_tps: dict[tuple[str, int], float], tps: dict[tuple[str, int], float], repeats: list[int]
) -> dict:
    qids = sorted({e["qid"] for e in entries})
    shared = [q for q in qids if all((q, r) in base_tps and (q, r) in tps for r in repeats)]
    per_repeat = []
    for r in repeats:
        if shared:
            mine = statistics.mean(tps[(q, r)] for q in shared)
            theirs = statistics.mean(base_tps[(q, r)] for q in shared)
            per_repeat.append(mine / theirs if theirs else 0.0)
    tokens = sum(e["tokens"] for e in entries)
    steps = sum(e["steps"] for e in entries)
    drafted = sum(e["drafted"] for e in entries)
    split = defaultdict(float)
    for e in entries:
        for k, v in e["split"].items():
            split[k] += v
    total = sum(e["seconds"] for e in entries)
    out = {
        "questions": len(qids),
        "new_tokens": tokens,
        "tokens_per_second": round(statistics.mean(tps[(q, r)] for q in qids for r in repeats if (q, r) in tps), 4)
        if qids
        else 0.0,
        "speedup": round(statistics.mean(per_repeat), 4) if per_repeat else None,
        "mean_accepted_tokens": round(tokens / steps, 4) if steps else None,
        "acceptance_rate": round(sum(e["accepted"] for e in entries) / drafted, 4) if drafted else None,
    }
    if len(per_repeat) > 1:
        out["speedup_min"], out["speedup_max"] = round(min(per_repeat), 4), round(max(per_repeat), 4)
    if split and total:
        out["time_fraction"] = {k: round(split.get(k, 0.0) / total, 4) for k in _TIME_KEYS}
    return out


def summarize(rows: list[dict], baseline: str, references: dict[str, str | None]) -> dict:
    """Per method, overall and per task: speedup, mean accepted tokens, acceptance, tokens/s, and two
    fidelity rates, the share of turns whose tokens equal a reference method's:

    - ``match_rate`` against ``references["exact"]``: plain decoding through the same numerics (``ar``),
      greedy or with the same seed. Every method must score 100%: it is the product's promise.
    - ``generate_rate`` against ``references["generate"]``: ``transformers``' ``generate`` on a copy of the
      model the engine never touched (``hf``, greedy only): what users compare with. Other kernels round
      differently, so this measures how often that shows in the text, not a defect.

    A reference of ``None`` (absent, or not applicable: unseeded sampling; ``hf`` when sampling) gives
    ``None`` rates."""
    groups = _questions(rows)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    repeats = sorted({k[2] for k in groups}) or [0]
    tps = {m: {} for m in methods}
    for (m, q, r), g in groups.items():
        tps[m][(q, r)] = g["tokens"] / g["seconds"] if g["seconds"] > 0 else 0.0
    base_tps = tps.get(baseline, {})
    summary = {
        "baseline": baseline,
        "references": dict(references),
        "methods": {},
        "mismatches": {},
        "generate_mismatches": {},
        "failed": {},
    }
    for m in methods:
        entries = [dict(g, qid=q) for (mm, q, r), g in groups.items() if mm == m]
        by_task = defaultdict(list)
        for e in entries:
            by_task[e["task"]].append(e)
        result = {"overall": _stats(entries, base_tps, tps[m], repeats), "tasks": {}}
        for task in [t for t in TASKS if t in by_task] + sorted(set(by_task) - set(TASKS)):
            result["tasks"][task] = _stats(by_task[task], base_tps, tps[m], repeats)
        for rate, key, ref in (
            ("match_rate", "mismatches", references.get("exact")),
            ("generate_rate", "generate_mismatches", references.get("generate")),
        ):
            fidelity = _fidelity(groups, m, ref)
            result["overall"][rate] = fidelity["rate"]
            for task, entry in result["tasks"].items():
                entry[rate] = fidelity["tasks"].get(task)
            summary[key][m] = fidelity["mismatches"]
        summary["methods"][m] = result
        failed = [
            {"question_id": r["question_id"], "turn": r["turn"], "repeat": r["repeat"], "error": r["error"]}
            for r in rows
            if r["method"] == m and r["status"] == "failed"
        ]
        if failed:
            summary["failed"][m] = failed
    return summary


def _fidelity(groups: dict, method: str, baseline: str | None) -> dict:
    """Compare every turn's tokens with the reference method's (repeat 0)."""
    if baseline is None:
        return {"rate": None, "tasks": {}, "mismatches": []}
    total, same = 0, 0
    per_task: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    mismatches = []
    for (m, q, r), g in groups.items():
        if m != method or r != 0 or (baseline, q, 0) not in groups:
            continue
        ref = groups[(baseline, q, 0)]["outputs"]
        for turn, (a, b) in enumerate(zip(g["outputs"], ref, strict=False)):
            total += 1
            per_task[g["task"]][1] += 1
            pos = first_divergence(a, b)
            if pos is None:
                same += 1
                per_task[g["task"]][0] += 1
            else:
                mismatches.append({"question_id": q, "task": g["task"], "turn": turn, "position": pos})
    return {
        "rate": round(same / total, 4) if total else None,
        "tasks": {t: round(s / n, 4) for t, (s, n) in per_task.items() if n},
        "mismatches": mismatches,
    }
