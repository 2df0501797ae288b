"""Running a benchmark: every method on every question, interleaved, recorded row by row, resumable."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import GenerationConfig
from ..text import encode_prompt
from .methods import MethodSpec, TurnResult, run_turn
from .suite import BenchInputError, Question

RECORDS = "records.jsonl"
RUN_INFO = "run.json"
# Settings that define what was measured: a resumed run must agree on all of them.
_IDENTITY = (
    "model",
    "dtype",
    "max_new_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "questions",
    "per_task",
    "tasks",
)


@dataclass
class BenchSettings:
    model: str
    methods: list[MethodSpec]
    questions: list[Question]
    out: Path
    dtype: str = "auto"
    device: str = "cpu"
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    repeats: int = 1
    baseline: str = "hf"
    warmup: bool = True
    questions_source: str = "built-in"
    per_task: int | None = None
    tasks: list[str] | None = None

    def generation_config(self) -> GenerationConfig:
        return GenerationConfig(
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            seed=self.seed,
        )

    def info(self) -> dict:
        return {
            "model": self.model,
            "dtype": self.dtype,
            "device": self.device,
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "seed": self.seed,
            "questions": self.questions_source,
            "per_task": self.per_task,
            "tasks": self.tasks,
            "methods": [m.label for m in self.methods],
            "baseline": self.baseline,
            "repeats": self.repeats,
        }


def machine_info() -> dict:
    from importlib.metadata import version

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": version("transformers"),
    }


def read_records(out: Path) -> list[dict]:
    path = out / RECORDS
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut by an interruption: drop it and what follows
    return rows


def completed_groups(rows: list[dict], turns_of: dict) -> set[tuple[str, str, int]]:
    """(method, question id, repeat) groups that are finished: all turns recorded, or a failure."""
    seen: dict[tuple[str, str, int], list[dict]] = {}
    for r in rows:
        seen.setdefault((r["method"], str(r["question_id"]), r["repeat"]), []).append(r)
    done = set()
    for key, group in seen.items():
        if any(r["status"] == "failed" for r in group) or len({r["turn"] for r in group}) >= turns_of.get(key[1], 1):
            done.add(key)
    return done


def prepare_out(settings: BenchSettings) -> list[dict]:
    """Create the output folder, or check that an existing one holds the same run; keep only complete
    (method, question, repeat) groups of its records."""
    out = settings.out
    out.mkdir(parents=True, exist_ok=True)
    info_path = out / RUN_INFO
    info = settings.info()
    if info_path.is_file():
        old = json.loads(info_path.read_text())
        diff = [k for k in _IDENTITY if old.get(k) != info.get(k)]
        if diff:
            raise BenchInputError(
                f"{out} holds a run with other settings ({', '.join(diff)}); use another --out to start afresh."
            )
        info["started"] = old.get("started")
        info["methods"] = list(dict.fromkeys(old.get("methods", []) + info["methods"]))
    else:
        info["started"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    info["machine"] = machine_info()
    info_path.write_text(json.dumps(info, indent=1))
    rows = read_records(out)
    turns_of = {str(q.id): len(q.turns) for q in settings.questions}
    done = completed_groups(rows, turns_of)
    keep = [r for r in rows if (r["method"], str(r["question_id"]), r["repeat"]) in done]
    with (out / RECORDS).open("w", encoding="utf-8") as f:
        for r in keep:
            f.write(json.dumps(r) + "\n")
    return keep


def _row(
    spec: MethodSpec, q: Question, turn: int, repeat: int, prompt_len: int, res: TurnResult | None, error: str | None
) -> dict:
    row = {
        "method": spec.label,
        "kind": spec.kind,
        "question_id": q.id,
        "task": q.task,
        "category": q.category,
        "turn": turn,
        "repeat": repeat,
        "status": "ok" if error is None else "failed",
        "error": error,
        "prompt_tokens": prompt_len,
    }
    if res is not None:
        row.update(
            new_tokens=len(res.output_ids),
            seconds=res.seconds,
            steps=res.steps,
            drafted=res.drafted,
            accepted=res.accepted,
            accepted_lengths=res.accepted_lengths,
            draft_lengths=res.draft_lengths,
            skip_sets=res.skip_sets,
            modes=res.modes,
            time_split=res.time_split,
            output_ids=res.output_ids,
        )
    return row


def run_benchmark(settings: BenchSettings, model, tokenizer, *, log=print, peers: dict | None = None) -> list[dict]:
    """Run what ``records.jsonl`` does not hold yet; return all records. ``peers``: what the peer methods
    run on (see :func:`~.methods.run_turn`)."""
    from tqdm.auto import tqdm

    peers = {} if peers is None else peers  # one dict for the run: it also holds the methods' suffix indexes
    rows = prepare_out(settings)
    turns_of = {str(q.id): len(q.turns) for q in settings.questions}
    done = completed_groups(rows, turns_of)
    base = settings.generation_config()
    todo = [
        (q, rep, spec)
        for q in settings.questions
        for rep in range(settings.repeats)
        for spec in settings.methods
        if (spec.label, str(q.id), rep) not in done
    ]
    if not todo:
        log("Nothing left to run: every method has every question in records.jsonl.")
        return rows
    if settings.warmup:
        warm = encode_prompt(tokenizer, "Say hello.")
        for spec in settings.methods:
            run_turn(model, tokenizer, spec, base.updated(max_new_tokens=8), warm, peers)
    total = len(settings.questions) * settings.repeats * len(settings.methods)
    bar = tqdm(total=total, initial=total - len(todo), desc="bench", unit="run", dynamic_ncols=True)
    records = (settings.out / RECORDS).open("a", encoding="utf-8")
    try:
        for index, q in enumerate(settings.questions):
            # Interleave methods per question, rotating their order so drift hits all of them alike.
            shift = index % len(settings.methods)
            order = settings.methods[shift:] + settings.methods[:shift]
            for rep in range(settings.repeats):
                for spec in order:
                    if (spec.label, str(q.id), rep) in done:
                        continue
                    cfg = base if base.seed is None else base.updated(seed=base.seed + index * 1000 + rep)
                    new = _run_question(model, tokenizer, spec, cfg, q, rep, peers)
                    for r in new:
                        records.write(json.dumps(r) + "\n")
                    records.flush()
                    rows.extend(new)
                    bar.set_postfix_str(f"{spec.label} q={q.id}")
                    bar.update(1)
    finally:
        records.close()
        bar.close()
    return rows


def _run_question(
    model, tokenizer, spec: MethodSpec, cfg: GenerationConfig, q: Question, rep: int, peers: dict | None = None
) -> list[dict]:
    """All turns of one question; the conversation carries the method's own earlier answers."""
    messages: list[dict] = []
    out = []
    for turn, text in enumerate(q.turns):
        messages.append({"role": "user", "content": text})
        prompt_ids: list[int] = []
        try:
            prompt_ids = encode_prompt(tokenizer, messages)
            res = run_turn(model, tokenizer, spec, cfg, prompt_ids, peers)
        except Exception as e:  # recorded, and the run goes on
            err = f"{type(e).__name__}: {e}"
            if not isinstance(e, (ValueError, RuntimeError)):
                err += "\n" + traceback.format_exc(limit=3)
            out.append(_row(spec, q, turn, rep, len(prompt_ids), None, err))
            break
        out.append(_row(spec, q, turn, rep, len(prompt_ids), res, None))
        messages.append({"role": "assistant", "content": res.text})
    return out
