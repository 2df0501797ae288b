"""The ``clasp`` command."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from clasp_decoding.cli import main


def run_json(capsys, *args) -> dict:
    assert main(["generate", "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_generate_json_with_compare(capsys, tiny_model_dir):
    out = run_json(
        capsys,
        "--model",
        str(tiny_model_dir),
        "--dtype",
        "fp32",
        "-n",
        "24",
        "--compare",
        "--num-skip",
        "2",
        "A hash table",
    )
    for key in (
        "text",
        "new_tokens",
        "mean_accepted_tokens",
        "tokens_per_second",
        "baseline_tokens_per_second",
        "ar_tokens_per_second",
        "generate_tokens_per_second",
        "speedup",
        "identical",
        "identical_to_generate",
    ):
        assert key in out
    assert out["identical"] is True  # with plain decoding through our loop: the promise
    assert isinstance(out["identical_to_generate"], bool)  # with an untouched generate: measured
    assert out["baseline_tokens_per_second"] == max(out["ar_tokens_per_second"], out["generate_tokens_per_second"])
    assert out["new_tokens"] == out["stats"]["new_tokens"] > 0
    assert out["speedup"] == pytest.approx(out["tokens_per_second"] / out["baseline_tokens_per_second"], rel=1e-2)


def test_sampling_compare_reports_identical_as_not_applicable(capsys, tiny_model_dir):
    out = run_json(
        capsys,
        "--model",
        str(tiny_model_dir),
        "-n",
        "8",
        "--compare",
        "--temperature",
        "0.8",
        "--seed",
        "3",
        "--top-p",
        "0.9",
        "hello",
    )
    assert out["identical"] is True  # seeded: the text plain decoding gives with that seed
    assert out["identical_to_generate"] is None  # generate draws its own random numbers


def test_streaming_output_and_statistics(capsys, tiny_model_dir):
    assert main(["generate", "--model", str(tiny_model_dir), "-n", "16", "--raw", "Recursion"]) == 0
    captured = capsys.readouterr()
    assert "mean accepted tokens" in captured.err and "tok/s" in captured.err
    assert captured.out.strip() != ""


def test_prompt_from_stdin(tiny_model_dir, monkeypatch, capsys):
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("A hash table"))
    out = run_json(capsys, "--model", str(tiny_model_dir), "-n", "6")
    assert out["new_tokens"] > 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--temperature", "-1"], "temperature must be >= 0"),
        (["--top-p", "0"], "top_p must be in"),
        (["-n", "0"], "max_new_tokens must be a positive integer"),
        (["--skip-layers", "1,x", "--method", "static"], "--skip-layers must be comma-separated integers"),
        (["--num-skip", "99"], "num_skip=99 must be below"),
    ],
)
def test_bad_arguments_give_one_clear_line(capsys, tiny_model_dir, args, message):
    assert main(["generate", "--model", str(tiny_model_dir), *args, "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("clasp: error: ") and message in err


def test_empty_prompt_and_unknown_model(capsys, tiny_model_dir, monkeypatch):
    assert main(["generate", "--model", str(tiny_model_dir), "  "]) == 2
    assert "prompt is empty" in capsys.readouterr().err
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["generate", "--model", "nope/nothing", "hi"]) == 2
    assert "Unknown model 'nope/nothing'" in capsys.readouterr().err


def test_models_lists_the_builtins(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in ("smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b", "gemma3-270m", "(default)"):
        assert name in out


def test_console_entry_point(tiny_model_dir):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, "-m", "clasp_decoding", "generate", "--json", "-n", "4", "--model", str(tiny_model_dir), "hi"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["new_tokens"] > 0
