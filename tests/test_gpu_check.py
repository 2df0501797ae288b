"""The GPU check script works the first time: its dry run runs every check end to end on the CPU, with
graphs captured through the stand-in, and writes its report."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), PYTHONWARNINGS="ignore")
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run"], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-4000:]
    report = (tmp_path / "gpu_check.md").read_text()
    for section in ("1. Exactness", "2. Split placement", "3. LLaMA shape", "4. Deep"):
        assert f"## {section}" in report and "FAILED" not in report, report
    assert "| tiny fp32, greedy `clasp` through captured graphs = `generate` | 4/4 |" in report
    assert "graphs captured inside a round: 0" in report
    assert (tmp_path / "gpu_check.json").stat().st_size > 100
