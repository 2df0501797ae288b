#!/usr/bin/env python3
"""How often the kernel tests catch plausible kernel bugs, planted one at a time (docs/numerics.md).

Each mutant is one small change to the C++ sources that a real mistake could make. For each, the sources
are copied, the change applied, the library built from the copy into a scratch cache
(``$CLASP_KERNEL_SOURCES``, ``$CLASP_CACHE_DIR``) and the kernel tests run against it in a fresh process:
a mutant is *caught* when some test fails. The unchanged copy runs first (a false alarm there voids the
table). Mutants that change only what an instruction set this CPU lacks runs (AMX's emulation against the
real tiles) can be caught only where that instruction set is present; the table says which ran.

- ``k-tail-when-chunked``: the vector kernels drop the remainder of K in the last chunk when the sum is
  cut into chunks (many rows): a row alone and in a 300-row call differ;
- ``chunk-restart``: a chunked sum restarts from zero instead of the previous chunk's partial sums;
- ``int4-leftover-rows``: the int4 kernel's leftover rows run through the full-height kernel, reading past
  the input (results of the valid rows unchanged: only the guard-page test sees it);
- ``tile-copy-past-row``: the tile kernel copies whole 32-element blocks of x, past a row's end at a K
  tail (reads past the input at the last row);
- ``tile-rows-dropped``: the tile kernel rounds its row-block count down when M is one above a multiple of
  16 (the last row never computed);
- ``fp-mode-of-caller``: the dispatcher no longer fixes the denormal mode at entry;
- ``attention-reversed-tail``: the attention kernel sums the last keys' scores in the reverse order of d
  (those rows no longer equal their own decoding step);
- ``emulation-manual-order``: the AMX emulation adds the pairs in the order of the Intel manual's
  pseudo-code instead of the measured one (caught only where real tiles run);
- ``int8-int32-total``: the VNNI int8 kernel adds its 16 lanes in int32 (the total overflows on long
  rows of large values); ``int8-no-residual``: it drops the residual part of x in the main loop (a row
  with an outlier loses its small values); ``int8-lane-bound``: it quantizes x to the full int16 range
  whatever K (lanes overflow on long rows). Caught only where AVX512-BF16 runs.

Usage: python scripts/kernel_mutants.py [--only k-tail-when-chunked,chunk-restart]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ROOT / "src" / "clasp_decoding" / "csrc"
TESTS = ["tests/test_kernels.py", "tests/test_tiles.py"]

MUTANTS: dict[str, tuple[str, str, str]] = {
    "k-tail-when-chunked": (
        "kernels_impl.h",
        "if (k < k1) {  // only in the last chunk",
        "if (k < k1 && k0 == 0) {  // only in the last chunk",
    ),
    "chunk-restart": (
        "kernels_impl.h",
        "acc[i][j] = resume ? state[i * TNB + j] : O::zero();",
        "acc[i][j] = O::zero();",
    ),
    "int4-leftover-rows": ("kernels_impl.h", "      if (mb == MB_I4)\n", "      if (mb >= 1)\n"),
    "tile-copy-past-row": ("tile_gemm.h", "min64(32, K - kb * 32) * sizeof(uint16_t)", "32 * sizeof(uint16_t)"),
    "tile-rows-dropped": ("tile_gemm.h", "const int64_t RB = (M + 15) / 16;", "const int64_t RB = (M + 14) / 16;"),
    "fp-mode-of-caller": (
        "dispatch.cpp",
        "_mm_setcsr(flush ? (saved_ | bits) : (saved_ & ~bits));",
        "(void)bits;",
    ),
    "attention-reversed-tail": (
        "kernels_impl.h",
        "for (int64_t d = 0; d < D; d++) {\n    const typename A::V k0 = A::load(kt + d * SP + j);\n",
        "for (int64_t d = D - 1; d >= 0; d--) {\n    const typename A::V k0 = A::load(kt + d * SP + j);\n",
    ),
    "emulation-manual-order": (
        "kernels_tile.cpp",
        "C[m][n] = flush(flush(C[m][n]) + flush(even + odd));",
        "C[m][n] = flush(flush(flush(C[m][n]) + even) + odd);",
    ),
    "int8-int32-total": (
        "kernels_avx512bf16.cpp",
        "  const __m512i lo = _mm512_cvtepi32_epi64(_mm512_castsi512_si256(acc));\n"
        "  const __m512i hi = _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(acc, 1));\n"
        "  return _mm512_reduce_add_epi64(_mm512_add_epi64(lo, hi));",
        "  return _mm512_reduce_add_epi32(acc);",
    ),
    "int8-no-residual": (
        "kernels_avx512bf16.cpp",
        "        al[j] = _mm512_dpwssd_epi32(al[j], lv, wv);\n      }",
        "      }",
    ),
    "int8-lane-bound": (
        "kernels_avx512bf16.cpp",
        "  return bound < 32767 ? bound : 32767;",
        "  return 32767;",
    ),
}


def planted(scratch: Path, name: str | None) -> Path:
    """A copy of the sources with mutant ``name`` applied (``None``: unchanged)."""
    src = scratch / "src"
    shutil.copytree(SOURCES, src)
    if name is not None:
        file, old, new = MUTANTS[name]
        text = (src / file).read_text()
        if text.count(old) != 1:
            raise SystemExit(f"{name}: its snippet is not once in {file} (the sources changed; update the mutant)")
        (src / file).write_text(text.replace(old, new))
    return src


def run(name: str | None) -> tuple[str, str, float]:
    """Build the (mutated) copy and run the kernel tests on it: (verdict, first failing test, seconds)."""
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="clasp-mutant-") as tmp:
        scratch = Path(tmp)
        env = {
            **os.environ,
            "CLASP_KERNEL_SOURCES": str(planted(scratch, name)),
            "CLASP_CACHE_DIR": str(scratch / "cache"),
        }
        build = subprocess.run(
            [sys.executable, "-c", "from clasp_decoding import kernels; assert kernels.available(), kernels._load()"],
            env=env, cwd=ROOT, capture_output=True, text=True,
        )  # fmt: skip
        if build.returncode != 0:
            return "build failed", build.stderr.strip().splitlines()[-1][:120], time.perf_counter() - t0
        tests = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *TESTS],
            env=env, cwd=ROOT, capture_output=True, text=True,
        )  # fmt: skip
        lines = tests.stdout.splitlines()
        failed = next((ln.split()[1] for ln in lines if ln.startswith(("FAILED", "ERROR")) and " " in ln), "")
        if tests.returncode != 0 and not failed:  # the test process itself died (a crash is caught too)
            where = next((ln.strip() for ln in (tests.stdout + tests.stderr).splitlines() if "File" in ln), "")
            failed = f"crashed (exit {tests.returncode}) {where}"[:120]
        verdict = "caught" if tests.returncode != 0 else "survived"
        return verdict, failed, time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default="", help="comma-separated mutant names (default: all)")
    a = p.parse_args()
    names = [n for n in a.only.split(",") if n] or list(MUTANTS)
    unknown = set(names) - set(MUTANTS)
    if unknown:
        raise SystemExit(f"unknown mutants {sorted(unknown)}; known: {', '.join(MUTANTS)}")
    from clasp_decoding import kernels

    print(f"CPU kernels here: {', '.join(kernels.isas())}; tile kernels: {', '.join(kernels.tile_isas())}")
    verdict, failed, seconds = run(None)
    print(f"unchanged sources: {verdict} ({failed or 'every test passes'}), {seconds:.0f} s")
    if verdict != "survived":
        print("a false alarm: the table below means nothing until the unchanged sources pass")
    print("\n| mutant | verdict | first failing test | seconds |\n| --- | --- | --- | --- |")
    caught = 0
    for name in names:
        verdict, failed, seconds = run(name)
        caught += verdict == "caught"
        print(f"| `{name}` | {verdict} | {failed.split('::')[-1] if failed else '-'} | {seconds:.0f} |", flush=True)
    print(f"\ncaught {caught} of {len(names)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
