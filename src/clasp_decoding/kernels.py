"""The project's compiled CPU kernels: building them once, loading them, and the raw operators.

Decoding on a CPU is a stream of matrix products with 1 to 64 rows, bound by reading the weights. The
kernels in ``csrc/`` read each weight once per call whatever the row count, and compute every output
element as one sum in a fixed order: a row's bits never depend on how many rows share the call or which
thread computes it. That is what makes a verification of ``k`` drafts (and a batch of several users)
bit-identical to one-token decoding. Two families:

- **Tile kernels** (bf16 weights packed once into 1 KB tiles, :func:`pack_tiles`): the AMX tiles
  themselves (``amx``), the same sums on AVX-512 vector units (``tile_avx512``) and an exact scalar
  emulation of the tiles (``tile_emulated``, any CPU: the tests' reference). All three give the same
  bits, so which one runs a call is a question of speed only.
- **Vector kernels** on plain row-major weights, one file per instruction set (AVX-512 with BF16,
  AVX-512, AVX2, portable C++), each with its own order of summation; also fp32 weights, the draft's
  int8/int4 copies and the attention kernel.

Building: each source file is compiled with its own instruction-set flags (no per-function pragmas, so
``g++`` and ``clang++`` both build them; a file the compiler cannot build is left out and its kernel is
not offered), then linked into one library in the cache directory, keyed by the sources, the flags and
torch's version only. A built library is loaded as it is, from a read-only cache or a second checkout
too. A build happens in a private folder renamed into place when complete, under a lock the OS releases
when the process dies: a build killed halfway leaves nothing that blocks or misleads the next process.
``CLASP_KERNELS=0`` switches the kernels off; ``$CXX`` names the compiler. Where they cannot be built,
:func:`available` is false, the reason is said once, and callers use torch's kernels instead.

Nothing above this module calls the operators blindly: :mod:`.cpu_linear` chooses among them by
measuring and installs the choice as a model's linear layers; :mod:`.quant` runs the draft's copies.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import fcntl
import functools
import hashlib
import mmap
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import torch

from .paths import cache_dir

SOURCES = Path(os.environ.get("CLASP_KERNEL_SOURCES") or Path(__file__).with_name("csrc"))
"""The C++ sources (``$CLASP_KERNEL_SOURCES`` builds another copy: scripts/kernel_mutants.py plants bugs in
one; the cache key is their content, so such a build never meets the real one)."""
LIBRARY = "clasp_kernels.so"
BASE_FLAGS = ["-O3", "-std=c++17", "-fPIC", "-ffp-contract=off", "-Wno-ignored-attributes"]
"""``-ffp-contract=off``: the compiler may not fuse a multiply and an add on its own, so each kernel's
order of operations is the one written (explicit FMA intrinsics stay FMAs)."""

_AVX512 = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mbmi2"]
ISA_FILES: dict[str, tuple[str, list[str]]] = {
    # file: (the macro telling the dispatcher it was built, the file's own flags); x86-64 only
    "kernels_avx2.cpp": ("CLASP_HAVE_AVX2", ["-mavx2", "-mfma", "-mbmi2"]),
    "kernels_avx512.cpp": ("CLASP_HAVE_AVX512", _AVX512),
    "kernels_avx512bf16.cpp": ("CLASP_HAVE_AVX512BF16", [*_AVX512, "-mavx512bf16", "-mavx512vnni"]),
    "kernels_tile_avx512.cpp": ("CLASP_HAVE_TILE_AVX512", _AVX512),
    "kernels_amx.cpp": ("CLASP_HAVE_AMX", [*_AVX512, "-mamx-tile", "-mamx-bf16"]),
}
PORTABLE_FILES = ["kernels_scalar.cpp", "kernels_tile.cpp"]
BUILD_WAIT_SECONDS = 600.0


def _x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def _tag() -> str:
    digest = hashlib.sha256()
    for path in sorted(SOURCES.iterdir()):
        if path.suffix in (".cpp", ".h"):
            digest.update(path.name.encode() + path.read_bytes())
    digest.update(repr((BASE_FLAGS, ISA_FILES, PORTABLE_FILES)).encode())
    return f"torch{torch.__version__}-{platform.machine()}-{digest.hexdigest()[:12]}"


def library_path() -> Path:
    """Where this build of the kernels lives in the cache."""
    return cache_dir() / "kernels" / _tag() / LIBRARY


def compiler() -> str | None:
    """``$CXX``, else the first of ``c++``, ``g++``, ``clang++`` on PATH."""
    return os.environ.get("CXX") or next((c for c in ("c++", "g++", "clang++") if shutil.which(c)), None)


def _compile(cxx: str, source: Path, obj: Path, flags: list[str]) -> str | None:
    """Compile one file; ``None`` on success, else the compiler's first error line."""
    cmd = [cxx, *BASE_FLAGS, *flags, f"-I{SOURCES}", "-c", str(source), "-o", str(obj)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        return f"{cxx}: {e.strerror}"
    if done.returncode == 0:
        return None
    lines = [ln for ln in done.stderr.splitlines() if "error" in ln] or done.stderr.splitlines() or ["failed"]
    return lines[0].strip()


def _build(folder: Path) -> tuple[Path, list[str]]:
    """Compile and link the library in ``folder``; returns it and what to tell (files left out, and why)."""
    from torch.utils import cpp_extension

    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (install g++ or clang++, or set $CXX)")
    isa = {f: flags for f, (_, flags) in ISA_FILES.items()} if _x86() else {}
    jobs = {f: [] for f in PORTABLE_FILES} | isa
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        results = pool.map(lambda f: _compile(cxx, SOURCES / f, folder / f"{f}.o", jobs[f]), jobs)
        errors = dict(zip(jobs, results, strict=True))
    for f in PORTABLE_FILES:
        if errors[f]:
            raise RuntimeError(f"{f}: {errors[f]}")
    built = [f for f in isa if errors[f] is None]
    torch_flags = [f"-isystem{p}" for p in cpp_extension.include_paths()]
    torch_flags.append(f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}")
    have = [f"-D{ISA_FILES[f][0]}=1" for f in built]
    notes = [f"left out {f} ({errors[f]})" for f in isa if errors[f]]
    glue = ["-fopenmp", *torch_flags, *have]
    linker = cxx
    error = _compile(cxx, SOURCES / "dispatch.cpp", folder / "dispatch.o", glue)
    if error and "omp.h" in error:
        # torch's headers need OpenMP's (clang without libomp-dev): the dispatcher alone with g++, if present
        other = next((c for c in ("g++", "c++") if shutil.which(c) and c != cxx), None)
        if other and _compile(other, SOURCES / "dispatch.cpp", folder / "dispatch.o", glue) is None:
            notes.append(f"dispatch.cpp built with {other}: {cxx} has no OpenMP headers, which torch's need")
            error, linker = None, other
    if error:
        raise RuntimeError(f"dispatch.cpp: {error}")
    # Portable objects first: where several files emitted the same inline function of the standard
    # library, the linker keeps the first, so no instruction-set-specific copy ever serves portable code.
    objs = [folder / "dispatch.o", *(folder / f"{f}.o" for f in PORTABLE_FILES), *(folder / f"{f}.o" for f in built)]
    libs = cpp_extension.library_paths()
    out = folder / LIBRARY
    cmd = [linker, "-shared", "-fopenmp", *map(str, objs), "-o", str(out), *(f"-L{p}" for p in libs)]
    cmd += ["-lc10", "-ltorch_cpu", *(f"-Wl,-rpath,{p}" for p in libs)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"linking failed: {(done.stderr.strip().splitlines() or ['?'])[0]}")
    return out, notes


def _hold(lock_file) -> bool:
    """Hold ``lock_file`` (the OS releases it when this process dies); wait for another process's
    build at most :data:`BUILD_WAIT_SECONDS`, saying so once."""
    start, said = time.monotonic(), False
    while True:
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError:
            if time.monotonic() - start > BUILD_WAIT_SECONDS:
                return False
            if not said:
                print("Waiting for another process building clasp-decoding's kernels ...", file=sys.stderr, flush=True)
                said = True
            time.sleep(0.25)


def _build_library(target: Path) -> tuple[Path, list[str]]:
    """Build the library: into ``target`` under the cache's lock where the cache is writable, else into a
    private temporary folder. Returns where it is and what to tell the user."""
    notes: list[str] = []
    lock = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        lock = open(target.parent.parent / f"{target.parent.name}.lock", "a")  # noqa: SIM115 (held until the build ends)
    except OSError as e:
        notes.append(f"the cache {target.parent.parent} is not writable ({e.strerror}): built for this process only")
    try:
        if lock is not None and not _hold(lock):
            notes.append("another process held the build lock too long: built for this process only")
            lock.close()
            lock = None
        if lock is not None and target.is_file():
            return target, notes  # another process finished it while this one waited
        print("Building clasp-decoding's CPU kernels for this machine (once) ...", file=sys.stderr, flush=True)
        home = target.parent if lock is not None else Path(tempfile.mkdtemp(prefix="clasp-kernels-"))
        work = Path(tempfile.mkdtemp(prefix=".build-", dir=home))
        try:
            built, told = _build(work)
            final = target if lock is not None else home / LIBRARY
            os.replace(built, final)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        notes += told
        return final, notes
    finally:
        if lock is not None:
            lock.close()


_LOCK = threading.Lock()
NOTES: list[str] = []
"""What the build left out or worked around (said once, by :func:`available`)."""


def _load() -> str | None:
    """Build (once per machine) and load the kernels (once per process, whichever thread asks first);
    ``None`` on success, else why they are unavailable."""
    with _LOCK:
        return _load_once()


@functools.cache
def _load_once() -> str | None:
    if os.environ.get("CLASP_KERNELS", "1") == "0":
        return "switched off by CLASP_KERNELS=0"
    path = library_path()
    try:
        if not path.is_file():
            path, notes = _build_library(path)
            NOTES.extend(notes)
        torch.ops.load_library(str(path))
        torch.ops.clasp_kernels.isas()
    except Exception as e:  # a missing compiler, a failed build: torch's kernels instead
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return f"{type(e).__name__}: {first}"
    return None


def available() -> bool:
    """Whether the kernels are built and loaded (building them on first call); says why not, once."""
    reason = _load()
    if reason is not None:
        _warn_once(reason)
    elif NOTES:
        _note_once(tuple(NOTES))
    return reason is None


def _ops():
    """The operators, loading them first (any public wrapper may be the first call)."""
    if not available():
        raise RuntimeError(f"clasp-decoding's CPU kernels are unavailable: {_load()}")
    return torch.ops.clasp_kernels


@functools.cache
def _warn_once(reason: str) -> None:
    warnings.warn(
        f"clasp-decoding's CPU kernels are unavailable ({reason}); using torch's kernels instead. They round "
        "differently, so greedy text can differ from the same model on a machine with the kernels where two "
        "tokens nearly tie; verification pads single rows where that keeps it exact.",
        RuntimeWarning,
        stacklevel=3,
    )


@functools.cache
def _note_once(notes: tuple[str, ...]) -> None:
    warnings.warn("clasp-decoding's CPU kernels: " + "; ".join(notes), RuntimeWarning, stacklevel=3)


# ----------------------------------------------------------------------------- memory for weights

HUGE_PAGE = 2 << 20


def empty_in_huge_pages(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialized 1-D CPU tensor whose whole 2 MB stretches are backed by huge pages where Linux
    allows (see :func:`in_huge_pages`); a plain tensor where it does not or the tensor is small."""
    nbytes = numel * torch.empty(0, dtype=dtype).element_size()
    if nbytes < 2 * HUGE_PAGE or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(numel, dtype=dtype)
    size = -(-nbytes // mmap.PAGESIZE) * mmap.PAGESIZE
    try:
        area = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        base = ctypes.addressof(ctypes.c_char.from_buffer(area))
        first = -(-base // HUGE_PAGE) * HUGE_PAGE - base  # the first 2 MB boundary inside the area
        whole = (size - first) // HUGE_PAGE * HUGE_PAGE
        if whole > 0:
            area.madvise(mmap.MADV_HUGEPAGE, first, whole)
    except (OSError, ValueError, TypeError):
        return torch.empty(numel, dtype=dtype)
    return torch.frombuffer(area, dtype=dtype, count=numel)  # keeps ``area`` alive


def in_huge_pages(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` whose whole 2 MB stretches Linux backs with huge pages (transparent huge pages,
    asked for with ``madvise``), else ``t`` itself. Streaming gigabytes of weights through 4 KB pages
    misses the TLB at every page: measured 6-8% more read bandwidth for a 1-row product with huge pages
    (AMD Zen 5). Only the aligned 2 MB stretches inside the tensor are advised, so no tensor grows: its
    ragged ends stay on 4 KB pages. Small tensors and tensors that are not plain contiguous CPU memory
    stay as they are."""
    nbytes = t.numel() * t.element_size()
    if t.device.type != "cpu" or not t.is_contiguous() or nbytes < 2 * HUGE_PAGE:
        return t
    out = empty_in_huge_pages(t.numel(), t.dtype).view(t.shape)
    out.copy_(t)
    return out


def file_mappings() -> list[tuple[int, int]]:
    """Address ranges this process maps privately from files (``/proc/self/maps``): where weights loaded
    lazily from a safetensors file live until something copies them."""
    out = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                parts = line.split()
                if len(parts) >= 6 and parts[5].startswith("/") and parts[1].endswith("p"):
                    lo, hi = (int(v, 16) for v in parts[0].split("-"))
                    out.append((lo, hi))
    except OSError:
        pass
    return out


def _all_file_pages(first: int, last: int) -> bool:
    """Whether every resident page of ``[first, last)`` is still the file's own (none copied on write),
    from ``/proc/self/pagemap`` (bit 63: present; bit 61: a file page)."""
    count = (last - first) // mmap.PAGESIZE
    try:
        with open("/proc/self/pagemap", "rb") as f:
            f.seek(first // mmap.PAGESIZE * 8)
            raw = f.read(count * 8)
    except OSError:
        return False
    if len(raw) != count * 8:
        return False
    flags = torch.frombuffer(bytearray(raw), dtype=torch.int64)
    present = (flags >> 63) & 1
    file_page = (flags >> 61) & 1
    return bool(((present == 0) | (file_page == 1)).all())


def release_file_pages(t: torch.Tensor, mappings: list[tuple[int, int]]) -> int:
    """Drop ``t``'s pages from this process's resident memory if ``t`` lies in a private file mapping (one
    of ``mappings``) and none of its pages was written, after its contents were copied elsewhere (packed
    tiles, a huge-page copy). The pages stay in the file, so anything still reading ``t`` faults them back
    in unchanged. Returns the bytes released. Without it, a model loaded from a mapped safetensors file
    counts twice (its file pages and our copy) for as long as the file stays mapped."""
    if t.device.type != "cpu" or not mappings or not hasattr(mmap, "MADV_DONTNEED"):
        return 0
    start = t.data_ptr()
    end = start + t.numel() * t.element_size()
    first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
    last = end // mmap.PAGESIZE * mmap.PAGESIZE
    for lo, hi in mappings:
        if lo <= start and end <= hi:
            if last > first and _all_file_pages(first, last) and _madvise(first, last - first, mmap.MADV_DONTNEED) == 0:
                return last - first
            return 0
    return 0


def trim_memory() -> None:
    """Give the C allocator's free memory back to the OS (glibc's ``malloc_trim``) after a phase of large
    temporary buffers (packing, quantizing): without it, freed buffers below glibc's adaptive mmap
    threshold stay resident."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _madvise(address: int, length: int, advice: int) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc.madvise(address, length, advice)


# ----------------------------------------------------------------------------- the operators


def isas() -> list[str]:
    """The vector kernels' instruction sets this CPU runs, best first (empty without kernels)."""
    return list(torch.ops.clasp_kernels.isas()) if available() else []


def isa() -> str | None:
    """The best vector instruction set here, or ``None`` without kernels."""
    found = isas()
    return found[0] if found else None


def tile_isas() -> list[str]:
    """The tile kernels this process can run: ``amx`` (where the CPU has it and Linux grants the tile
    state), ``tile_avx512``, and always ``tile_emulated``. Empty without kernels."""
    return list(torch.ops.clasp_kernels.tile_isas()) if available() else []


def amx_status() -> str:
    """Whether the AMX tiles run here: ``"granted"``, or why not (``"absent"``, ``"not built ..."``,
    ``"switched off by CLASP_AMX=0"``, ``"refused by the OS ..."``)."""
    return str(torch.ops.clasp_kernels.amx_status()) if available() else "no kernels"


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, isa: str = "") -> torch.Tensor:
    """``x @ weight.T + bias`` for bf16 (fp32 sums, bf16 result) or fp32 weights; ``x`` ``[..., K]`` in
    the weight's dtype. Row-invariant. ``isa`` forces an instruction set (tests compare them all)."""
    return _ops().linear(x, weight, bias, isa)


def linear_int8(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None, isa: str = ""
) -> torch.Tensor:
    """``x @ (qweight * scale[:, None]).T + bias``: int8 weights ``[N, K]``, one fp32 scale per output
    feature, bf16 ``x`` and result."""
    return _ops().linear_int8(x, qweight, scale, bias, isa)


def set_int8_prefetch(on: bool) -> bool:
    """Whether :func:`linear_int8` asks for the next block of weight rows ahead, where its kernel has the
    choice (chosen by measurement: :func:`.cpu_linear.int8_prefetch`); returns the previous setting."""
    return bool(_ops().set_int8_prefetch(on))


def linear_int4(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    group: int,
    bias: torch.Tensor | None = None,
    isa: str = "",
) -> torch.Tensor:
    """Grouped int4 weights (:func:`pack_int4`): ``w = q * scale + zero`` per group of ``group`` inputs."""
    return _ops().linear_int4(x, packed, scale, zero, group, bias, isa)


TILE_ELEMS = 16 * 32
"""bf16 values in one packed tile (1 KB)."""


def tile_elements(n: int, k: int) -> int:
    """Elements of a packed ``[n, k]`` weight: whole tiles, zero-padded."""
    return -(-n // 16) * -(-k // 32) * TILE_ELEMS


def pack_tiles(weight: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """A bf16 weight ``[N, K]`` as the tile kernels read it: 1-D, ``ceil(N/16) * ceil(K/32)`` tiles of
    16 input pairs x 16 output features (``csrc/tile_gemm.h``), zero-padded; written into ``out`` (of
    :func:`tile_elements` bf16 values) when given."""
    if out is None:
        return _ops().pack_tiles(weight)
    _ops().pack_tiles_into(weight, out)
    return out


def unpack_tile_rows(packed: torch.Tensor, n: int, k: int, ids: torch.Tensor) -> torch.Tensor:
    """Rows ``ids`` of the ``[n, k]`` weight that ``packed`` holds (an embedding lookup, a slice)."""
    return _ops().unpack_tile_rows(packed, n, k, ids)


def tile_linear(
    x: torch.Tensor, packed: torch.Tensor, n: int, k: int, bias: torch.Tensor | None = None, isa: str = ""
) -> torch.Tensor:
    """``x @ weight.T + bias`` with the weight as :func:`pack_tiles` packed it; the AMX tiles' numerics
    (bf16 in, fp32 sums in the tiles' order, bf16 out), whichever tile kernel ``isa`` names (default the
    first of :func:`tile_isas`)."""
    return _ops().tile_linear(x, packed, n, k, bias, isa)


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    start: int,
    window: int = 0,
    scale: float | None = None,
    isa: str = "",
) -> torch.Tensor:
    """Causal attention of query rows ``[1, Hq, R, D]`` at positions ``start ..`` over ``key`` / ``value``
    ``[1, Hkv, S, D]`` (a cache's readable slots; grouped-query heads shared): row ``r`` sees keys
    ``[0, start + r + 1)`` (the last ``window`` of them with a sliding window). Returns ``[1, R, Hq, Dv]``
    (the layout ``transformers``' attention functions return). Each row is computed on its own, in a fixed
    order: its bits are those of the same query attended alone."""
    s = query.shape[-1] ** -0.5 if scale is None else float(scale)
    return _ops().attention(query, key, value, start, window, s, isa)


def pack_int4(
    weight: torch.Tensor, group: int, huge_pages: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize ``weight`` ``[N, K]`` to 4 bits per value, asymmetric per group of ``group`` inputs (a
    multiple of 64 dividing ``K``): ``(packed [N, K / 2] uint8, scale [N, G], zero [N, G])`` with
    ``w ~= q * scale + zero``, ``q`` in 0..15. Per 64-value block, byte ``j`` holds value ``j`` in its
    low nibble and value ``j + 32`` in its high nibble (the layout the kernels unpack). Works through
    the weight in slices of rows, so it never holds more than a slice in fp32."""
    n, k = weight.shape
    if group % 64 or k % group:
        raise ValueError(f"int4 groups must be a multiple of 64 dividing {k}, got {group}")
    if huge_pages and weight.device.type == "cpu":
        packed = empty_in_huge_pages(n * (k // 2), torch.uint8).view(n, k // 2)
    else:
        packed = torch.empty(n, k // 2, dtype=torch.uint8, device=weight.device)
    scale = torch.empty(n, k // group, device=weight.device)
    zero = torch.empty(n, k // group, device=weight.device)
    for r0, r1 in _row_slices(n, k):
        grouped = weight[r0:r1].detach().float().view(r1 - r0, k // group, group)
        lo, hi = grouped.amin(-1), grouped.amax(-1)
        s = (hi - lo).clamp_min(1e-8) / 15
        q = ((grouped - lo[..., None]) / s[..., None]).round().clamp(0, 15).to(torch.uint8)
        blocks = q.view(r1 - r0, k // 64, 2, 32)
        packed[r0:r1] = (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(r1 - r0, k // 2)
        scale[r0:r1], zero[r0:r1] = s, lo
    return packed, scale, zero


SLICE_VALUES = 1 << 19
"""Values of a weight quantized at a time (:func:`pack_int4`, :func:`quantize_int8`): 2 MB in fp32, small
enough that the temporary buffers never pile up in the C allocator's heap."""


def _row_slices(n: int, k: int):
    step = max(1, SLICE_VALUES // max(1, k))
    for r0 in range(0, n, step):
        yield r0, min(n, r0 + step)


def quantize_int8(weight: torch.Tensor, huge_pages: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric int8: ``(q [N, K] int8, scale [N] fp32)`` with ``w ~= q * scale``,
    worked through in slices of rows (no full fp32 copy of the weight)."""
    n, k = weight.shape
    if huge_pages and weight.device.type == "cpu":
        q = empty_in_huge_pages(n * k, torch.int8).view(n, k)
    else:
        q = torch.empty(n, k, dtype=torch.int8, device=weight.device)
    scale = torch.empty(n, device=weight.device)
    for r0, r1 in _row_slices(n, k):
        w = weight[r0:r1].detach().float()
        s = w.abs().amax(1).clamp_min(1e-8) / 127
        q[r0:r1] = (w / s[:, None]).round().clamp(-128, 127).to(torch.int8)
        scale[r0:r1] = s
    return q, scale


def unpack_int4(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int) -> torch.Tensor:
    """The fp32 weights :func:`pack_int4`'s output stands for (the reference the tests compare with)."""
    n, half = packed.shape
    k = half * 2
    blocks = packed.view(n, k // 64, 32)
    q = torch.stack([blocks & 15, blocks >> 4], dim=2).view(n, k // group, group).float()
    return (q * scale[..., None] + zero[..., None]).view(n, k)
