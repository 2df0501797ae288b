"""The benchmark: Spec-Bench arithmetic on hand-made records, fidelity, resume, inputs, a tiny end-to-end run."""

from __future__ import annotations

import json

import pytest

from clasp_decoding.bench.methods import parse_methods
from clasp_decoding.bench.metrics import first_divergence, summarize
from clasp_decoding.bench.run import BenchSettings, completed_groups, prepare_out, read_records
from clasp_decoding.bench.suite import BenchInputError, Question, builtin_questions, load_questions, select, task_of
from clasp_decoding.cli import main


def rec(method, qid, task, turn, tokens, seconds, steps=None, drafted=0, accepted=0, ids=None, repeat=0, status="ok"):
    return {
        "method": method,
        "kind": method.split("[")[0],
        "question_id": qid,
        "task": task,
        "category": task,
        "turn": turn,
        "repeat": repeat,
        "status": status,
        "error": None if status == "ok" else "boom",
        "new_tokens": tokens,
        "seconds": seconds,
        "steps": steps if steps is not None else tokens,
        "drafted": drafted,
        "accepted": accepted,
        "accepted_lengths": [],
        "output_ids": ids or [1] * tokens,
    }


def test_spec_bench_arithmetic():
    rows = [
        # question 1 (two turns): baseline 10 tok/s over both turns; method 20 + 20 tokens in 1 + 1 s
        rec("hf", 1, "mt_bench", 0, 10, 1.0),
        rec("hf", 1, "mt_bench", 1, 30, 3.0),
        rec("m", 1, "mt_bench", 0, 10, 0.5, steps=4, drafted=10, accepted=6),
        rec("m", 1, "mt_bench", 1, 30, 1.5, steps=10, drafted=30, accepted=20),
        # question 2: baseline 5 tok/s; method 10 tok/s
        rec("hf", 2, "qa", 0, 10, 2.0),
        rec("m", 2, "qa", 0, 10, 1.0, steps=5, drafted=8, accepted=5),
    ]
    s = summarize(rows, "hf", {"exact": "hf", "generate": None})
    m = s["methods"]["m"]
    # Per question tokens/s over all turns; speedup = mean over questions / the baseline's mean.
    assert m["overall"]["tokens_per_second"] == pytest.approx((20 + 10) / 2)
    assert m["overall"]["speedup"] == pytest.approx(((40 / 2) + (10 / 1)) / 2 / ((40 / 4 + 10 / 2) / 2), abs=1e-4)
    assert m["tasks"]["mt_bench"]["speedup"] == pytest.approx(2.0)
    assert m["tasks"]["qa"]["speedup"] == pytest.approx(2.0)
    # Mean accepted tokens = new tokens / steps; acceptance = accepted / drafted.
    assert m["overall"]["mean_accepted_tokens"] == pytest.approx(50 / 19, abs=1e-4)
    assert m["overall"]["acceptance_rate"] == pytest.approx(31 / 48, abs=1e-4)
    assert s["methods"]["hf"]["overall"]["speedup"] == pytest.approx(1.0)
    assert s["methods"]["hf"]["overall"]["acceptance_rate"] is None


def test_repeats_give_a_spread_and_failures_are_reported():
    rows = []
    for rep, secs in ((0, 1.0), (1, 0.5)):
        rows += [rec("hf", 1, "qa", 0, 10, 1.0, repeat=rep), rec("m", 1, "qa", 0, 10, secs, repeat=rep)]
    rows.append(rec("m", 2, "qa", 0, 0, 0.0, status="failed"))
    s = summarize(rows, "hf", {"exact": "hf", "generate": None})
    o = s["methods"]["m"]["overall"]
    assert o["speedup"] == pytest.approx(1.5) and o["speedup_min"] == 1.0 and o["speedup_max"] == 2.0
    assert s["failed"]["m"][0]["question_id"] == 2


def test_fidelity_checker_catches_a_planted_divergence():
    base = [1, 2, 3, 4, 5, 6]
    rows = [
        rec("hf", 1, "qa", 0, 6, 1.0, ids=base),
        rec("hf", 2, "rag", 0, 6, 1.0, ids=base),
        rec("good", 1, "qa", 0, 6, 1.0, ids=list(base)),
        rec("good", 2, "rag", 0, 6, 1.0, ids=list(base)),
        rec("bad", 1, "qa", 0, 6, 1.0, ids=base[:3] + [9, 9, 9]),
        rec("bad", 2, "rag", 0, 6, 1.0, ids=list(base)),
    ]
    s = summarize(rows, "hf", {"exact": "hf", "generate": None})
    assert s["methods"]["good"]["overall"]["match_rate"] == 1.0 and not s["mismatches"]["good"]
    assert s["methods"]["bad"]["overall"]["match_rate"] == 0.5
    assert s["methods"]["bad"]["tasks"]["qa"]["match_rate"] == 0.0
    assert s["mismatches"]["bad"] == [{"question_id": "1", "task": "qa", "turn": 0, "position": 3}]
    assert first_divergence([1, 2], [1, 2, 3]) == 2 and first_divergence([1], [1]) is None
    sampled = summarize(rows, "hf", {"exact": None, "generate": None})
    assert sampled["methods"]["bad"]["overall"]["match_rate"] is None  # not applicable


def test_questions_files_and_selection(tmp_path):
    good = tmp_path / "q.jsonl"
    good.write_text(
        "\n".join(
            json.dumps({"question_id": i, "category": c, "turns": ["hi"]})
            for i, c in enumerate(["writing", "qa", "qa", "rag", "coding"])
        )
        + "\n"
    )
    qs = load_questions(good)
    assert [q.task for q in qs] == ["mt_bench", "qa", "qa", "rag", "mt_bench"]
    assert [q.id for q in select(qs, per_task=1)] == [0, 1, 3]
    assert [q.id for q in select(qs, tasks=["qa"])] == [1, 2]
    assert task_of("math_reasoning") == "math_reasoning" and task_of("stem") == "mt_bench"
    bad = tmp_path / "bad.jsonl"
    for text, msg in [
        ("{oops", "line 1 is not valid JSON"),
        ('{"question_id": 1}', "lacks category, turns"),
        ('{"question_id": 1, "category": "qa", "turns": []}', "non-empty list"),
        ("", "holds no questions"),
    ]:
        bad.write_text(text)
        with pytest.raises(BenchInputError, match=msg):
            load_questions(bad)
    with pytest.raises(BenchInputError, match="does not exist"):
        load_questions(tmp_path / "nope.jsonl")
    with pytest.raises(BenchInputError, match="Unknown task"):
        select(qs, tasks=["poetry"])
    built_in = builtin_questions()
    assert {q.task for q in built_in} == {"mt_bench", "translation", "summarization", "qa", "math_reasoning", "rag"}


def test_method_lists():
    specs = parse_methods("ar,hf,clasp[num_skip=3,draft_exit_threshold=0.8],static[skip_layers=1|3],pld")
    assert [s.label for s in specs][2] == "clasp[num_skip=3,draft_exit_threshold=0.8]"
    assert dict(specs[2].overrides) == {"num_skip": 3, "draft_exit_threshold": 0.8}
    assert dict(specs[3].overrides) == {"skip_layers": (1, 3)}
    for text, msg in [
        ("ar,medusa", "Unknown method 'medusa'"),
        ("clasp[num_skip]", "not key=value"),
        ("clasp[top_p=7]", "top_p must be in"),
        ("ar,ar", "listed twice"),
        ("", "No methods"),
    ]:
        with pytest.raises(BenchInputError, match=msg):
            parse_methods(text)


def test_resume_keeps_finished_groups_and_redoes_partial_ones(tmp_path):
    qs = [Question(1, "mt_bench", "writing", ("a", "b")), Question(2, "qa", "qa", ("c",))]
    settings = BenchSettings(model="m", methods=parse_methods("ar"), questions=qs, out=tmp_path)
    prepare_out(settings)
    rows = [
        rec("ar", 1, "mt_bench", 0, 5, 1.0),
        rec("ar", 1, "mt_bench", 1, 5, 1.0),  # complete
        rec("ar", 2, "qa", 0, 5, 1.0, repeat=0),
    ]
    partial = rec("ar", 1, "mt_bench", 0, 5, 1.0, repeat=1)  # turn 1 missing: redo
    with (tmp_path / "records.jsonl").open("w") as f:
        for r in rows + [partial]:
            f.write(json.dumps(r) + "\n")
        f.write('{"method": "ar", "quest')  # a line cut by an interruption
    kept = prepare_out(settings)
    assert len(kept) == 3 and partial not in kept
    assert len(read_records(tmp_path)) == 3
    assert completed_groups(kept, {"1": 2, "2": 1}) == {("ar", "1", 0), ("ar", "2", 0)}
    other = BenchSettings(model="other", methods=parse_methods("ar"), questions=qs, out=tmp_path)
    with pytest.raises(BenchInputError, match="other settings .*model"):
        prepare_out(other)


def test_tiny_end_to_end_run_and_resume(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "run"
    args = [
        "bench",
        "--model",
        str(tiny_model_dir),
        "--dtype",
        "fp32",
        "--methods",
        "ar,hf,clasp[num_skip=2],pld,hybrid",
        "--per-task",
        "1",
        "--max-new-tokens",
        "16",
        "--out",
        str(out),
        "--static-budget",
        "3",
    ]
    assert main(args) == 0
    rows = read_records(out)
    assert len(rows) == 5 * 7  # 5 methods x (5 one-turn questions + 1 two-turn question)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["references"] == {"exact": "ar", "generate": "hf"}
    for method in ("ar", "clasp[num_skip=2]", "pld", "hybrid"):
        assert summary["methods"][method]["overall"]["match_rate"] == 1.0
        assert 0.0 <= summary["methods"][method]["overall"]["generate_rate"] <= 1.0
        assert set(summary["methods"][method]["tasks"]) == {
            "mt_bench",
            "translation",
            "summarization",
            "qa",
            "math_reasoning",
            "rag",
        }
    for png in ("speedup_per_task.png", "accepted_lengths.png", "clasp_skip_sets.png"):
        assert (out / png).stat().st_size > 1000
    assert "| `clasp[num_skip=2]` |" in (out / "summary.md").read_text()
    capsys.readouterr()
    assert main(args) == 0  # resumes: nothing left to do
    assert len(read_records(out)) == len(rows)
    assert "Nothing left to run" in capsys.readouterr().err


def test_seeded_sampling_run_checks_every_text_against_plain_decoding(tmp_path, tiny_model_dir, capsys):
    """With --temperature and --seed, every engine method's text must equal ``ar``'s under the same seed
    (``hf`` draws its own random numbers, so it is the speed baseline but not the text reference)."""
    out = tmp_path / "sampled"
    args = ["bench", "--model", str(tiny_model_dir), "--dtype", "fp32", "--methods", "hf,ar,clasp,pld,hybrid"]
    args += ["--tasks", "qa,summarization", "--per-task", "1", "--max-new-tokens", "16"]
    args += ["--temperature", "0.8", "--seed", "3", "--out", str(out), "--no-plots"]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["references"] == {"exact": "ar", "generate": None}  # generate samples its own way
    for method in ("ar", "clasp", "pld", "hybrid"):
        assert summary["methods"][method]["overall"]["match_rate"] == 1.0, method
    assert "same as `ar`" in (out / "summary.md").read_text()
    capsys.readouterr()


def test_static_method_runs_its_search_first(tmp_path, tiny_model_dir, monkeypatch, capsys):
    monkeypatch.setenv("CLASP_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "static"
    assert (
        main(
            [
                "bench",
                "--model",
                str(tiny_model_dir),
                "--dtype",
                "fp32",
                "--methods",
                "hf,static",
                "--tasks",
                "qa",
                "--per-task",
                "1",
                "--max-new-tokens",
                "8",
                "--out",
                str(out),
                "--static-budget",
                "3",
                "--no-plots",
            ]
        )
        == 0
    )
    info = json.loads((out / "run.json").read_text())
    assert info["static_search"]["evaluations"] == 3 and info["static_search"]["search_seconds"] > 0
    assert list((tmp_path / "cache" / "static").glob("*.json"))  # cached for the next run
    assert "static search 3/3" in capsys.readouterr().err


def test_bad_bench_input_stops_before_work(tmp_path, capsys):
    assert main(["bench", "--methods", "ar,warp"]) == 2
    assert "Unknown method 'warp'" in capsys.readouterr().err
    assert main(["bench", "--questions", str(tmp_path / "missing.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["bench", "--methods", "ar,clasp", "--baseline", "hf"]) == 2
    assert "--baseline 'hf' is not among --methods" in capsys.readouterr().err
    assert main(["bench", "--tasks", "poetry"]) == 2
    assert "Unknown task" in capsys.readouterr().err
