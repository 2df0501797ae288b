"""Benchmark questions: Spec-Bench's file format, and a small built-in suite covering its six tasks."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import ClaspError

TASKS = (
    "mt_bench", "translation", "summarization", "qa", "math_reasoning", "rag",
    "repeat_extract", "repeat_code", "repeat_chat",
)  # fmt: skip
"""Spec-Bench's six tasks, then the repeating workload's three (data/repeat_workload)."""
_SINGLE_TASK_CATEGORIES = set(TASKS) - {"mt_bench"}


class BenchInputError(ClaspError, ValueError):
    """A questions file, method list or task list that cannot be used."""


@dataclass(frozen=True)
class Question:
    id: int | str
    task: str
    category: str
    turns: tuple[str, ...]


def task_of(category: str) -> str:
    """Spec-Bench's task for a category: the five single-task categories are their own task, every
    other category belongs to the multi-turn conversation task (mt_bench)."""
    return category if category in _SINGLE_TASK_CATEGORIES else "mt_bench"


def load_questions(path: str | Path) -> list[Question]:
    """Read a Spec-Bench ``question.jsonl``; a missing file or a bad line is one clear error."""
    p = Path(path)
    if not p.is_file():
        raise BenchInputError(f"Questions file {str(path)!r} does not exist.")
    out = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise BenchInputError(f"{p.name} line {n} is not valid JSON ({e.msg}).") from None
        if not isinstance(row, dict):
            raise BenchInputError(f"{p.name} line {n} is not a JSON object.")
        missing = [k for k in ("question_id", "category", "turns") if k not in row]
        if missing:
            raise BenchInputError(f"{p.name} line {n} lacks {', '.join(missing)}.")
        turns = row["turns"]
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
            raise BenchInputError(f"{p.name} line {n}: 'turns' must be a non-empty list of non-empty strings.")
        out.append(Question(row["question_id"], task_of(str(row["category"])), str(row["category"]), tuple(turns)))
    if not out:
        raise BenchInputError(f"Questions file {str(path)!r} holds no questions.")
    return out


def select(questions: list[Question], per_task: int | None = None, tasks: list[str] | None = None) -> list[Question]:
    """The first ``per_task`` questions of each task (file order), for the given tasks."""
    if tasks:
        unknown = sorted(set(tasks) - set(TASKS))
        if unknown:
            raise BenchInputError(f"Unknown task(s) {', '.join(unknown)}; known: {', '.join(TASKS)}.")
    if per_task is not None and per_task < 1:
        raise BenchInputError(f"--per-task must be at least 1, got {per_task}.")
    counts: dict[str, int] = {}
    out = []
    for q in questions:
        if tasks and q.task not in tasks:
            continue
        if per_task is not None and counts.get(q.task, 0) >= per_task:
            continue
        counts[q.task] = counts.get(q.task, 0) + 1
        out.append(q)
    if not out:
        raise BenchInputError("No questions left after selecting tasks.")
    return out


BUILTIN_ROWS = (
    (
        "mt-1",
        "writing",
        (
            "Write a short, friendly email inviting a colleague to a code review on Friday.",
            "Now rewrite it in a more formal tone.",
        ),
    ),
    (
        "mt-2",
        "coding",
        (
            "Write a Python function that checks whether a string is a palindrome.",
            "Add a docstring and two doctest examples.",
        ),
    ),
    (
        "tr-1",
        "translation",
        ("Translate German to English: Der Zug nach Berlin hat heute wegen eines Sturms eine Stunde Verspätung.",),
    ),
    (
        "tr-2",
        "translation",
        (
            "Translate German to English: Die Bibliothek bleibt während der Ferien "
            "geschlossen, aber die Online-Kataloge sind weiterhin verfügbar.",
        ),
    ),
    (
        "su-1",
        "summarization",
        (
            "Summarize the following article in two sentences.\n\nThe town of Millbrook opened its first public "
            "library in 1923 with three hundred books donated by local families. Over the next century it grew "
            "into a regional hub, adding a children's wing in 1965 and a computer lab in 1998. Last week the "
            "council approved a renovation that will add solar panels, a quiet study floor and longer opening "
            "hours. Librarians say visits have doubled since 2015, driven by students and remote workers. The "
            "renovation will start in March and the library will stay open during the works.",
        ),
    ),
    (
        "su-2",
        "summarization",
        (
            "Summarize the following article in two sentences.\n\nA team of marine biologists has tagged forty "
            "sea turtles off the coast to study their migration. The tags report position and water temperature "
            "every hour. Early data show that the turtles travel further north than expected during warm years. "
            "The researchers hope the results will help protect feeding grounds. The project is funded for three "
            "years and volunteers help with the tagging each summer.",
        ),
    ),
    ("qa-1", "qa", ("Who wrote the novel Pride and Prejudice?",)),
    ("qa-2", "qa", ("What is the capital city of Australia?",)),
    (
        "ma-1",
        "math_reasoning",
        (
            "A baker makes 24 muffins in a batch. She bakes 5 batches and sells 97 "
            "muffins. How many muffins are left? Explain step by step.",
        ),
    ),
    (
        "ma-2",
        "math_reasoning",
        (
            "Tom reads 15 pages a day. His book has 240 pages and he has already read "
            "60 pages. How many more days does he need to finish? Explain step by step.",
        ),
    ),
    (
        "rag-1",
        "rag",
        (
            "Answer the question using the passages.\n\nPassage 1: The Eiffel Tower was completed in 1889 for the "
            "World's Fair in Paris. Passage 2: It was designed by the engineering company of Gustave Eiffel. "
            "Passage 3: The tower is 330 metres tall and was the tallest man-made structure until 1930.\n\n"
            "Question: When was the Eiffel Tower completed and who designed it?",
        ),
    ),
    (
        "rag-2",
        "rag",
        (
            "Answer the question using the passages.\n\nPassage 1: Photosynthesis converts light energy into "
            "chemical energy stored in glucose. Passage 2: It takes place mainly in the chloroplasts of plant "
            "leaves. Passage 3: Oxygen is released as a by-product.\n\nQuestion: Where does photosynthesis take "
            "place and what gas does it release?",
        ),
    ),
)
"""Two short questions per Spec-Bench task, written for this project: (id, category, turns)."""


def builtin_questions() -> list[Question]:
    """The built-in suite (so ``clasp bench`` runs on a fresh machine without the development file)."""
    return [Question(qid, task_of(cat), cat, turns) for qid, cat, turns in BUILTIN_ROWS]
