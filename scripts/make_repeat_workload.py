#!/usr/bin/env python
"""Build the repeating workload (data/repeat_workload/question.jsonl): requests that repeat themselves
across each other, as real traffic does, in Spec-Bench's file format (see that folder's README).

Three tasks, in this order (a benchmark runs them in file order, so later requests can learn from
earlier ones):

- ``repeat_extract``: one fixed instruction (extract people, organisations and places as JSON, in a fixed
  form) over the first sentences of Spec-Bench's summarization articles;
- ``repeat_code``: one fixed instruction (add type hints and a docstring, answer with code only) over
  small generated Python functions;
- ``repeat_chat``: Spec-Bench's two-turn conversations (the second turn carries the first answer).

Usage: python scripts/make_repeat_workload.py [--spec-bench ../shared/data/spec_bench/question.jsonl]
                                              [--per-task 12] [--out data/repeat_workload/question.jsonl]
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

EXTRACT = (
    "Extract every person, organisation and place named in the text below. Answer with JSON only, exactly in "
    'this form: {{"people": [...], "organisations": [...], "places": [...]}}.\n\nText: {text}'
)
CODE = "Add type hints and a one-line docstring to this Python function. Answer with the code only.\n\n```python\n{code}\n```"

NAMES = ["total", "average", "scale", "clip", "join_words", "count_vowels", "area", "distance", "merge", "flatten"]
ARGS = [("a", "b"), ("values",), ("x", "low", "high"), ("words", "sep"), ("text",), ("w", "h"), ("p", "q")]
BODIES = {
    ("a", "b"): ["return a + b", "return a * b - a", "return max(a, b) - min(a, b)"],
    ("values",): ["return sum(values) / len(values)", "return [v * 2 for v in values]", "return sorted(values)[-1]"],
    ("x", "low", "high"): ["return min(max(x, low), high)", "return (x - low) / (high - low)"],
    ("words", "sep"): ["return sep.join(words)", "return sep.join(w.upper() for w in words)"],
    ("text",): ["return sum(c in 'aeiou' for c in text.lower())", "return text.strip().split()", "return text[::-1]"],
    ("w", "h"): ["return w * h", "return 2 * (w + h)"],
    ("p", "q"): ["return ((p[0] - q[0]) ** 2 + (p[1] - q[1]) ** 2) ** 0.5", "return {**p, **q}"],
}


def first_sentences(article: str, n: int = 2) -> str:
    text = article.removeprefix("Summarize:").strip()
    parts = re.split(r"(?<=[.!?])\s+", text)
    return " ".join(parts[:n])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--spec-bench", default=str(Path(__file__).resolve().parents[2] / "shared/data/spec_bench/question.jsonl")
    )
    ap.add_argument("--per-task", type=int, default=12)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "data/repeat_workload/question.jsonl"))
    a = ap.parse_args()
    rows = [json.loads(line) for line in Path(a.spec_bench).read_text().splitlines() if line.strip()]
    rng = random.Random(0)
    out = []
    articles = [r["turns"][0] for r in rows if r["category"] == "summarization"]
    for i, article in enumerate(articles[: a.per_task]):
        out.append(
            {
                "question_id": f"x{i}",
                "category": "repeat_extract",
                "turns": [EXTRACT.format(text=first_sentences(article))],
            }
        )
    for i in range(a.per_task):
        args = rng.choice(ARGS)
        code = f"def {rng.choice(NAMES)}({', '.join(args)}):\n    {rng.choice(BODIES[args])}"
        out.append({"question_id": f"c{i}", "category": "repeat_code", "turns": [CODE.format(code=code)]})
    chats = [r for r in rows if len(r["turns"]) == 2]
    for r in chats[: a.per_task]:
        out.append({"question_id": f"t{r['question_id']}", "category": "repeat_chat", "turns": r["turns"]})
    path = Path(a.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in out))
    print(f"{len(out)} requests -> {path}")


if __name__ == "__main__":
    main()
