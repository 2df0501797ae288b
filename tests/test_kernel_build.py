"""Building and loading the kernels as users meet it: a build killed halfway, a read-only or shared cache,
a second checkout, another compiler, a compiler that rejects one instruction set. Each test builds into
its own empty cache folder, in a separate process."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clasp_decoding import kernels

SRC = Path(__file__).resolve().parents[1] / "src"
LOAD = "from clasp_decoding import kernels; assert kernels.available(), kernels._load(); print('tiles', kernels.tile_isas()); print('notes', kernels.NOTES)"

pytestmark = [
    pytest.mark.skipif(kernels.compiler() is None or not kernels.available(), reason="no C++ compiler here"),
    pytest.mark.slow,
]


def run(code: str, cache: Path, timeout: float = 900, **env) -> subprocess.CompletedProcess:
    full = dict(os.environ, CLASP_CACHE_DIR=str(cache), PYTHONPATH=str(SRC), **env)
    return subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True, timeout=timeout)


def snapshot(folder: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime for p in folder.rglob("*")}


def test_a_killed_build_leaves_nothing_that_blocks_and_the_library_is_then_reused(tmp_path):
    """Kill a first build halfway: the next process builds without waiting on anything. Then a process
    loads the built library without writing anything into the cache (so a read-only cache works), and a
    second checkout of the same sources uses the same build."""
    cache = tmp_path / "cache"
    env = dict(os.environ, CLASP_CACHE_DIR=str(cache), PYTHONPATH=str(SRC))
    first = subprocess.Popen([sys.executable, "-c", LOAD], env=env, stderr=subprocess.PIPE, stdout=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not list(cache.glob("kernels/*/.build-*/*.o")) and time.monotonic() < deadline:
        time.sleep(0.2)  # until it is compiling
    first.send_signal(signal.SIGKILL)
    first.wait()
    second = run(LOAD, cache)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "Building" in second.stderr and "Waiting" not in second.stderr  # nothing blocked it
    before = snapshot(cache)
    third = run(LOAD, cache)
    assert third.returncode == 0 and "Building" not in third.stderr, third.stderr[-2000:]
    assert snapshot(cache) == before  # nothing written: a read-only cache serves as well
    other = tmp_path / "checkout" / "src"
    shutil.copytree(SRC / "clasp_decoding", other / "clasp_decoding")
    full = dict(env, PYTHONPATH=str(other))
    elsewhere = subprocess.run([sys.executable, "-c", LOAD], env=full, capture_output=True, text=True, timeout=900)
    assert elsewhere.returncode == 0 and "Building" not in elsewhere.stderr, elsewhere.stderr[-2000:]


def test_a_compiler_that_rejects_one_instruction_set_builds_the_rest(tmp_path):
    """A compiler without AMX support (gcc before 11, say): that file is left out and said so; every
    other kernel builds and runs, and the tile kernels still run on vectors or the emulation."""
    cxx = kernels.compiler()
    wrapper = tmp_path / "cxx"
    wrapper.write_text(
        f'#!/bin/sh\nfor a in "$@"; do [ "$a" = "-mamx-tile" ] && {{ echo "error: unknown -mamx-tile" >&2; exit 1; }}; done\nexec {cxx} "$@"\n'
    )
    wrapper.chmod(0o755)
    done = run(LOAD, tmp_path / "cache", CXX=str(wrapper))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "kernels_amx.cpp" in done.stdout and "'amx'" not in done.stdout.split("notes")[0]
    assert "tile_emulated" in done.stdout


def test_amx_refused_or_switched_off_is_said_and_the_next_kernel_runs(tmp_path):
    """Where the tiles cannot run (here: switched off, as a refused arch_prctl leaves them), the choice
    falls to the next kernel down and a warning says why, once."""
    shutil.copytree(kernels.library_path().parent, tmp_path / "cache" / "kernels" / kernels.library_path().parent.name)
    code = (
        "import warnings, torch\n"
        "from clasp_decoding import kernels, cpu_linear\n"
        "with warnings.catch_warnings(record=True) as seen:\n"
        "    warnings.simplefilter('always')\n"
        "    c = cpu_linear.choice(torch.bfloat16); cpu_linear.choice(torch.bfloat16)\n"
        "print(kernels.amx_status(), 'amx' in kernels.tile_isas(), c.members)\n"
        "print(sum('AMX tiles' in str(w.message) for w in seen))\n"
    )
    done = run(code, tmp_path / "cache", CLASP_AMX="0")
    assert done.returncode == 0, done.stderr[-2000:]
    status, count = done.stdout.strip().splitlines()
    assert "amx" not in status.split(" False ")[-1] and " False " in status
    if status.startswith("switched off"):  # a CPU with AMX
        assert count == "1"
    else:
        assert status.startswith("absent") and count == "0"


@pytest.mark.skipif(shutil.which("clang++") is None, reason="clang++ is not installed here")
def test_clang_builds_every_kernel(tmp_path):
    """clang++ builds every instruction set's file (no gcc-only pragmas); where it lacks the OpenMP headers
    torch's own headers include, the dispatcher alone is built with g++, and that is said."""
    done = run(LOAD, tmp_path / "cache", CXX="clang++")
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
    notes = done.stdout.split("notes", 1)[1]
    assert "left out" not in notes and ("notes []" in done.stdout or "dispatch.cpp built with" in notes), notes
    assert "amx" in done.stdout or kernels.amx_status() != "granted"


def test_the_public_operators_load_the_kernels_themselves(tmp_path):
    """Calling an operator before anything asked whether the kernels are available works."""
    shutil.copytree(kernels.library_path().parent, tmp_path / "cache" / "kernels" / kernels.library_path().parent.name)
    code = (
        "import torch; from clasp_decoding import kernels; "
        "print(kernels.linear(torch.ones(1, 4).bfloat16(), torch.ones(3, 4).bfloat16()).tolist())"
    )
    done = run(code, tmp_path / "cache")
    assert done.returncode == 0 and "[[4.0, 4.0, 4.0]]" in done.stdout, done.stderr[-2000:]
