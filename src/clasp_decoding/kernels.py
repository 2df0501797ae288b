"""The project's compiled CPU kernels: building them once, loading them, and the fallback beside them.

Decoding on a CPU is a stream of matrix products with 1 to 64 rows, bound by reading the weights. The
kernels in ``csrc/`` (one file per instruction set: AVX-512 with BF16, AVX-512, AVX2, portable C++)
read each weight once per call whatever the row count, and compute every output element as one dot
product summed in a fixed order: a row's bits never depend on how many rows share the call. That is
what makes a verification of ``k`` drafts (and a batch of several users) bit-identical to one-token
decoding, without the single-row padding torch's kernels need.

They are compiled at first use with torch's C++ extension tooling (``ninja`` from PyPI, the system's
C++ compiler), into the cache directory, keyed by torch's version and the sources; later processes load
the built library in milliseconds. ``CLASP_KERNELS=0`` switches them off. Where they cannot be built,
:func:`available` is false, the reason is said once, and callers use torch's kernels instead.

The runner never calls these directly: :mod:`.numerics` installs them as the model's linear layers and
:mod:`.quant` uses them for the draft's int8/int4 weights. Which instruction set ran is this module's
business (:func:`isa`), chosen from the CPU's features at load time.
"""

from __future__ import annotations

import functools
import hashlib
import mmap
import os
import sys
import threading
import warnings
from pathlib import Path

import torch

from .paths import cache_dir

SOURCES = Path(__file__).with_name("csrc")
FLAGS = ["-O3", "-std=c++17", "-fopenmp", "-ffp-contract=off", "-Wno-ignored-attributes"]
"""``-ffp-contract=off``: the compiler may not fuse a multiply and an add on its own, so each kernel's
order of operations is the one written (explicit FMA intrinsics stay FMAs)."""


def _sources() -> list[Path]:
    return sorted(SOURCES.glob("*.cpp"))


def _build_dir() -> Path:
    digest = hashlib.sha256()
    for path in sorted(SOURCES.iterdir()):
        digest.update(path.name.encode() + path.read_bytes())
    digest.update(" ".join(FLAGS).encode())
    tag = f"torch{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}-{digest.hexdigest()[:12]}"
    return cache_dir() / "kernels" / tag


def _with_ninja_on_path() -> None:
    """torch's builder looks for ``ninja`` on PATH; the PyPI package's binary may not be there (a venv that
    was not activated)."""
    try:
        import ninja

        bin_dir = getattr(ninja, "BIN_DIR", None)
        if bin_dir and bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
            os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass


_LOCK = threading.Lock()


def _load() -> str | None:
    """Build (once per machine) and load the kernels (once per process, whichever thread asks first);
    ``None`` on success, else why they are unavailable."""
    with _LOCK:
        return _load_once()


@functools.cache
def _load_once() -> str | None:
    if os.environ.get("CLASP_KERNELS", "1") == "0":
        return "switched off by CLASP_KERNELS=0"
    if not _sources():
        return f"no kernel sources in {SOURCES}"
    try:
        from torch.utils import cpp_extension

        _with_ninja_on_path()
        build = _build_dir()
        built = (build / "clasp_kernels.so").is_file()
        if not built:
            build.mkdir(parents=True, exist_ok=True)
            print("Building clasp-decoding's CPU kernels for this machine (once) ...", file=sys.stderr, flush=True)
        cpp_extension.load(
            "clasp_kernels",
            [str(p) for p in _sources()],
            extra_cflags=FLAGS,
            extra_ldflags=["-fopenmp"],
            build_directory=str(build),
            is_python_module=False,
            verbose=False,
        )
        torch.ops.clasp_kernels.isas()
    except Exception as e:  # a missing compiler or ninja, a failed build: torch's kernels instead
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return f"{type(e).__name__}: {first}"
    return None


def available() -> bool:
    """Whether the kernels are built and loaded (building them on first call); says why not, once."""
    reason = _load()
    if reason is not None:
        _warn_once(reason)
    return reason is None


@functools.cache
def _warn_once(reason: str) -> None:
    warnings.warn(
        f"clasp-decoding's CPU kernels are unavailable ({reason}); using torch's kernels, with single rows "
        "padded for exact verification where that suffices.",
        RuntimeWarning,
        stacklevel=3,
    )


HUGE_PAGE = 2 << 20


def in_huge_pages(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` in memory the kernel backs with 2 MB pages where it can (Linux transparent huge
    pages, asked for with ``madvise``), else ``t`` itself. Streaming gigabytes of weights through 4 KB
    pages misses the TLB at every page: measured 6-8% more read bandwidth for a 1-row product with huge
    pages here (AMD Zen 5). Small tensors and tensors that are not plain contiguous CPU memory stay as
    they are."""
    nbytes = t.numel() * t.element_size()
    if t.device.type != "cpu" or not t.is_contiguous() or nbytes < HUGE_PAGE or not hasattr(mmap, "MADV_HUGEPAGE"):
        return t
    size = -(-nbytes // HUGE_PAGE) * HUGE_PAGE
    try:
        area = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        area.madvise(mmap.MADV_HUGEPAGE)
    except (OSError, ValueError):
        return t
    out = torch.frombuffer(area, dtype=t.dtype, count=t.numel()).view(t.shape)  # keeps ``area`` alive
    out.copy_(t)
    return out


def isas() -> list[str]:
    """The instruction sets this CPU runs the kernels with, best first (empty without kernels)."""
    return list(torch.ops.clasp_kernels.isas()) if available() else []


def isa() -> str | None:
    """The instruction set the kernels use here (the best supported), or ``None`` without kernels."""
    found = isas()
    return found[0] if found else None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, isa: str = "") -> torch.Tensor:
    """``x @ weight.T + bias`` for bf16 (fp32 sums, bf16 result) or fp32 weights; ``x`` ``[..., K]`` in
    the weight's dtype. Row-invariant. ``isa`` forces an instruction set (tests compare them all)."""
    return torch.ops.clasp_kernels.linear(x, weight, bias, isa)


def linear_int8(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None, isa: str = ""
) -> torch.Tensor:
    """``x @ (qweight * scale[:, None]).T + bias``: int8 weights ``[N, K]``, one fp32 scale per output
    feature, bf16 ``x`` and result."""
    return torch.ops.clasp_kernels.linear_int8(x, qweight, scale, bias, isa)


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
    return torch.ops.clasp_kernels.linear_int4(x, packed, scale, zero, group, bias, isa)


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
    return torch.ops.clasp_kernels.attention(query, key, value, start, window, s, isa)


def pack_int4(weight: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize ``weight`` ``[N, K]`` to 4 bits per value, asymmetric per group of ``group`` inputs (a
    multiple of 64 dividing ``K``): ``(packed [N, K / 2] uint8, scale [N, G], zero [N, G])`` with
    ``w ~= q * scale + zero``, ``q`` in 0..15. Per 64-value block, byte ``j`` holds value ``j`` in its
    low nibble and value ``j + 32`` in its high nibble (the layout the kernels unpack)."""
    n, k = weight.shape
    if group % 64 or k % group:
        raise ValueError(f"int4 groups must be a multiple of 64 dividing {k}, got {group}")
    grouped = weight.detach().float().view(n, k // group, group)
    lo, hi = grouped.amin(-1), grouped.amax(-1)
    scale = (hi - lo).clamp_min(1e-8) / 15
    q = ((grouped - lo[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.uint8)
    blocks = q.view(n, k // 64, 2, 32)
    packed = (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(n, k // 2).contiguous()
    return packed, scale.contiguous(), lo.contiguous()


def unpack_int4(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int) -> torch.Tensor:
    """The fp32 weights :func:`pack_int4`'s output stands for (the reference the tests compare with)."""
    n, half = packed.shape
    k = half * 2
    blocks = packed.view(n, k // 64, 32)
    q = torch.stack([blocks & 15, blocks >> 4], dim=2).view(n, k // group, group).float()
    return (q * scale[..., None] + zero[..., None]).view(n, k)
