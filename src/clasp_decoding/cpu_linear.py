"""Linear layers on the CPU: which kernel runs them, chosen by measuring on this machine, and the packed
weights the tile kernels read.

Three families compete for a dtype's linear layers (:mod:`.kernels` describes the kernels):

- ``tiles`` (bf16): the tile kernels, AMX where the CPU has it and Linux grants it, else the same sums on
  AVX-512 vector units. Weights are packed once into tiles (:class:`PackedWeight`), in place of the
  original: no second copy is kept.
- ``vector``: the row-major vector kernel of the best instruction set here.
- ``torch``: torch's own kernels (exact only as far as :func:`.numerics.probe_linear` finds them so).

The choice is measured, never assumed from the instruction set: each candidate runs 1, 8 and 64 rows
(decoding, a verification, a batch or a prompt's chunk) over 64 MB of weights, interleaved, best of
several rounds; the family whose times, relative to the best at each row count, sum lowest wins, and
within the tile family each row count gets its fastest member (their bits are the same, so this changes
speed only). The verdict is kept in the cache, per CPU and kernel build: a family change would change
rounding, so the same machine always computes the same text. ``CLASP_LINEAR`` forces a family
(``tiles``, ``vector``, ``torch``) or one tile kernel (``amx``, ``tile_avx512``, ``tile_emulated``).
"""

from __future__ import annotations

import functools
import json
import os
import platform
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.utils._pytree import tree_map

from . import kernels
from .paths import cache_dir

ROWS = (1, 8, 64)
"""Row counts measured: one token, a verification of 7 drafts, a batch or a prompt's chunk."""
BUCKET_EDGES = (1, 8)
"""Calls of 1 row take the kernel measured fastest at 1 row; 2-8 rows, at 8; more, at 64."""
FAMILIES = ("tiles", "vector", "torch")
TILE_KERNELS = ("amx", "tile_avx512", "tile_emulated")
MEASURE_BYTES = 64 << 20
"""The least weight memory a measurement cycles through."""
MEASURE_CAP = 512 << 20
"""The most (a host's last-level cache can be 300 MB and more: what is measured must come from memory)."""
MEASURE_METHOD = 2
"""Part of the key of kept verdicts: a change in how they are measured measures them again (2: weights
beyond the last-level cache; 1 measured 64 MB, inside a 300 MB cache, and picked a kernel 20% slower
for one row from memory)."""


@dataclass(frozen=True)
class Choice:
    """The kernel for one dtype's linear layers on this machine, and why."""

    dtype: str  # "bf16" or "fp32"
    family: str  # "tiles", "vector" or "torch"
    members: tuple[str, str, str]  # the kernel for calls of 1 row, 2-8 rows, more
    ms: dict  # candidate -> milliseconds per call at ROWS (empty when forced)
    forced: bool = False

    def member(self, rows: int) -> str:
        return self.members[0 if rows <= BUCKET_EDGES[0] else 1 if rows <= BUCKET_EDGES[1] else 2]

    def describe(self) -> str:
        names = dict(zip(("1 row", "2-8 rows", "more rows"), self.members, strict=True))
        if len(set(self.members)) == 1:
            how = self.members[0]
        else:
            how = ", ".join(f"{m} for {r}" for r, m in names.items())
        why = "forced by CLASP_LINEAR" if self.forced else "measured fastest here"
        return f"{self.family} ({how}; {why})"


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]


def _machine_key() -> str:
    """The CPU (model and flags), the kernel build and torch: what a verdict depends on."""
    cpu, flags = platform.machine(), ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu == platform.machine():
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith(("flags", "Features")) and not flags:
                flags = " ".join(
                    sorted(f for f in line.split(":", 1)[1].split() if f.startswith(("avx", "amx", "fma")))
                )
    except OSError:
        pass
    return f"{cpu} | {flags} | {kernels.library_path().parent.name} | m{MEASURE_METHOD}"


def last_level_cache_bytes() -> int:
    """The largest CPU cache's size (sysfs), or 64 MB if unknown."""
    best = 64 << 20
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            text = f.read_text().strip()
            scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
            best = max(best, int(text.rstrip("KMG")) * scale)
        except (OSError, ValueError):
            continue
    return best


def measure_bytes() -> int:
    """Weight memory a measurement cycles through: 1.5 times the last-level cache, within
    [:data:`MEASURE_BYTES`, :data:`MEASURE_CAP`], so that weights come from memory as in decoding."""
    return min(MEASURE_CAP, max(MEASURE_BYTES, int(1.5 * last_level_cache_bytes())))


def _store() -> Path:
    return cache_dir() / "kernels" / "linear-choice.json"


def _read_store() -> dict:
    try:
        return json.loads(_store().read_text())
    except (OSError, ValueError):
        return {}


def _write_store(data: dict) -> None:
    path = _store()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache: the verdict holds for this process


def _candidates(dtype: torch.dtype) -> dict[str, str]:
    """Candidate kernel -> its family."""
    out: dict[str, str] = {}
    if dtype is torch.bfloat16:
        for name in kernels.tile_isas():
            if name != "tile_emulated":
                out[name] = "tiles"
    if kernels.isa() is not None:
        out[kernels.isa()] = "vector"
    out["torch"] = "torch"
    return out


def product(name: str, weight: torch.Tensor, packed: torch.Tensor | None = None):
    """A call ``f(x)`` computing ``x @ weight.T`` with candidate kernel ``name`` (packing the weight for a
    tile kernel, unless given ``packed``)."""
    if name in TILE_KERNELS:
        packed = kernels.pack_tiles(weight) if packed is None else packed
        n, k = weight.shape
        return lambda x: kernels.tile_linear(x, packed, n, k, None, name)
    if name == "torch":
        return lambda x: torch.nn.functional.linear(x, weight)
    return lambda x: kernels.linear(x, weight, None, name)


def measure(dtype: torch.dtype, rounds: int = 5) -> dict[str, list[float]]:
    """Milliseconds per call of each candidate at :data:`ROWS` rows, over :func:`measure_bytes` of
    weights cycled (so that they come from memory, as in decoding, not from cache); candidates
    interleaved round by round, best round kept. The tile kernels share one packed copy."""
    n, k = 4096, 2048
    count = max(1, measure_bytes() // (n * k * torch.empty(0, dtype=dtype).element_size()))
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(n, k, generator=g).to(dtype) for _ in range(count)]
    best: dict[str, list[float]] = {}
    with torch.inference_mode():
        names = _candidates(dtype)
        packs = [kernels.pack_tiles(w) for w in weights] if any(nm in TILE_KERNELS for nm in names) else []
        calls = {name: [product(name, w, packs[i] if packs else None) for i, w in enumerate(weights)] for name in names}
        for name in calls:
            best[name] = [float("inf")] * len(ROWS)
        for i, rows in enumerate(ROWS):
            x = torch.randn(rows, k, generator=g).to(dtype)
            for fns in calls.values():
                fns[0](x)  # warm-up
            for _ in range(rounds):
                for name, fns in calls.items():
                    t0 = time.perf_counter()
                    for f in fns:
                        f(x)
                    best[name][i] = min(best[name][i], (time.perf_counter() - t0) * 1e3 / len(fns))
    return best


def decide(dtype: str, ms: dict[str, list[float]], families: dict[str, str]) -> Choice:
    """The family whose best times relative to the fastest at each row count sum lowest; within it, the
    fastest member per row bucket."""
    fastest = [min(t[i] for t in ms.values()) for i in range(len(ROWS))]
    per_family: dict[str, list[tuple[float, str]]] = {}
    for name, times in ms.items():
        fam = families[name]
        slots = per_family.setdefault(fam, [(float("inf"), "")] * len(ROWS))
        per_family[fam] = [min(s, (t, name)) for s, t in zip(slots, times, strict=True)]
    score = {fam: sum(t / f for (t, _), f in zip(slots, fastest, strict=True)) for fam, slots in per_family.items()}
    family = min(score, key=lambda f: (score[f], FAMILIES.index(f)))
    members = tuple(name for _, name in per_family[family])
    return Choice(dtype, family, members, ms)  # type: ignore[arg-type]


def _forced(dtype: torch.dtype, name: str) -> Choice:
    d = _dtype_name(dtype)
    if name in TILE_KERNELS:
        if dtype is not torch.bfloat16:  # the tiles are bf16's: other dtypes take the vector kernels
            return _forced(dtype, "vector")
        if name not in kernels.tile_isas():
            raise ValueError(f"CLASP_LINEAR={name}: not available here for {d} (available: {kernels.tile_isas()})")
        return Choice(d, "tiles", (name,) * 3, {}, forced=True)
    if name == "tiles":
        if dtype is not torch.bfloat16:
            return _forced(dtype, "vector")
        usable = [t for t in kernels.tile_isas() if t != "tile_emulated"] or kernels.tile_isas()
        return Choice(d, "tiles", (usable[0],) * 3, {}, forced=True)
    if name == "vector":
        if kernels.isa() is None:
            raise ValueError("CLASP_LINEAR=vector: the project's kernels are unavailable here")
        return Choice(d, "vector", (kernels.isa(),) * 3, {}, forced=True)
    if name == "torch":
        return Choice(d, "torch", ("torch",) * 3, {}, forced=True)
    raise ValueError(f"CLASP_LINEAR={name!r}: expected one of {FAMILIES + TILE_KERNELS}")


def choice(dtype: torch.dtype) -> Choice:
    """The kernel for ``dtype``'s linear layers here: ``CLASP_LINEAR`` if set, else the verdict kept for
    this machine, else measured now (once per machine) and kept."""
    forced = os.environ.get("CLASP_LINEAR", "").strip()
    if forced:
        return _forced(dtype, forced)
    return _verdict(dtype)


@functools.cache
def _say_amx() -> None:
    """Where the CPU has AMX but it cannot run, say why, once."""
    status = kernels.amx_status()
    if status not in ("granted", "absent", "no kernels"):
        warnings.warn(
            f"This CPU has AMX tiles, but they are {status}: the next kernel down runs instead.",
            RuntimeWarning,
            stacklevel=4,
        )


@functools.cache
def _verdict(dtype: torch.dtype) -> Choice:
    d = _dtype_name(dtype)
    if not kernels.available():
        return Choice(d, "torch", ("torch",) * 3, {})
    if dtype is torch.bfloat16:
        _say_amx()
    key = _machine_key()
    families = _candidates(dtype)
    kept = _read_store().get(key, {}).get(d)
    if kept and set(kept.get("ms", {})) == set(families):
        return Choice(d, kept["family"], tuple(kept["members"]), kept["ms"])
    verdict = decide(d, measure(dtype), families)
    data = _read_store()
    data.setdefault(key, {})[d] = asdict(verdict)
    _write_store(data)
    return verdict


@functools.cache
def int8_prefetch() -> bool:
    """Whether the int8 kernel (a quantized draft's layers) should prefetch the next block of weight rows:
    ``CLASP_INT8_PREFETCH`` (0 or 1) if set, else the verdict kept for this machine, else measured now
    (one-row products over :func:`measure_bytes` of int8 weights in a draft's shapes, both ways
    interleaved, the best round of each; on only if 3% faster) and kept. Applied to the kernels."""
    forced = os.environ.get("CLASP_INT8_PREFETCH", "").strip()
    if forced in ("0", "1"):
        on = forced == "1"
    elif not kernels.available():
        return False
    else:
        key = _machine_key()
        kept = _read_store().get(key, {}).get("int8_prefetch")
        if isinstance(kept, bool):
            on = kept
        else:
            on = _measure_int8_prefetch()
            data = _read_store()
            data.setdefault(key, {})["int8_prefetch"] = on
            _write_store(data)
    if kernels.available():
        kernels.set_int8_prefetch(on)
    return on


def _measure_int8_prefetch(rounds: int = 5) -> bool:
    g = torch.Generator().manual_seed(0)
    shapes = [(4096, 1536), (1536, 4096)]  # short rows and long ones, as in a layer's projections
    per = sum(n * k for n, k in shapes)
    weights = []
    for _ in range(max(1, measure_bytes() // per)):
        for n, k in shapes:
            weights.append((torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8), torch.rand(n) / 64))
    xs = {k: torch.randn(1, k, generator=g).bfloat16() for _, k in shapes}
    best = {False: float("inf"), True: float("inf")}
    before = kernels.set_int8_prefetch(False)
    try:
        with torch.inference_mode():
            for _ in range(rounds):
                for on in (False, True):
                    kernels.set_int8_prefetch(on)
                    t0 = time.perf_counter()
                    for q, scale in weights:
                        kernels.linear_int8(xs[q.shape[1]], q, scale)
                    best[on] = min(best[on], time.perf_counter() - t0)
    finally:
        kernels.set_int8_prefetch(before)
    return best[True] < best[False] / 1.03


# ----------------------------------------------------------------------------- packed weights

aten = torch.ops.aten


class PackedWeight(torch.Tensor):
    """A bf16 weight ``[N, K]`` held as the tile kernels' packed tiles (``kernels.pack_tiles``).

    It stands for the dense weight everywhere: ``F.linear`` runs the tile kernel on it, ``F.embedding``
    (a tied embedding) and row slices read just the rows they need, and any other operation sees the dense
    weight, unpacked for it (correct, not fast). A prefix of rows (``w[:n]``, a reduced draft head) is a
    view of the same tiles."""

    packed: torch.Tensor

    @staticmethod
    def __new__(cls, packed: torch.Tensor, shape: tuple[int, int]):
        return torch.Tensor._make_wrapper_subclass(
            cls, shape, dtype=torch.bfloat16, device=packed.device, requires_grad=False
        )

    def __init__(self, packed: torch.Tensor, shape: tuple[int, int]) -> None:
        self.packed = packed

    def __repr__(self) -> str:
        return f"PackedWeight(shape={tuple(self.shape)}, tiles={self.packed.numel() // kernels.TILE_ELEMS})"

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        n, k = self.shape
        return kernels.unpack_tile_rows(self.packed, n, k, ids)

    def dense(self) -> torch.Tensor:
        return self.rows(torch.arange(self.shape[0]))

    def prefix(self, n: int) -> PackedWeight:
        """Rows ``[0, n)`` as a view of the same tiles."""
        n = max(0, min(n, self.shape[0]))
        k = self.shape[1]
        return PackedWeight(self.packed[: kernels.tile_elements(n, k)], (n, k))

    def _getitem(self, index):
        if isinstance(index, slice) and index.step in (None, 1):
            start, stop, _ = index.indices(self.shape[0])
            if start == 0:
                return self.prefix(stop)
            return self.rows(torch.arange(start, max(start, stop)))
        if isinstance(index, (int, list)) or (isinstance(index, torch.Tensor) and index.dtype is torch.long):
            ids = torch.as_tensor(index, dtype=torch.long)
            out = self.rows(ids.reshape(-1))
            return out.view(*ids.shape, self.shape[1])
        return None

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.linear:
            out = _linear(*args, **kwargs)
            if out is not None:
                return out
        elif func is torch.nn.functional.embedding:
            out = _embedding(*args, **kwargs)
            if out is not None:
                return out
        elif func is torch.Tensor.__getitem__ and isinstance(args[0], PackedWeight):
            out = args[0]._getitem(args[1])
            if out is not None:
                return out
        elif getattr(func, "__name__", "") == "__get__" or func in _AS_IS:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*tree_map(_dense, args), **tree_map(_dense, kwargs))

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (aten.detach.default, aten.alias.default) and isinstance(args[0], PackedWeight):
            return PackedWeight(args[0].packed, tuple(args[0].shape))
        if func is aten.clone.default and isinstance(args[0], PackedWeight):
            return PackedWeight(args[0].packed.clone(), tuple(args[0].shape))
        return func(*tree_map(_dense, args), **tree_map(_dense, kwargs))


_AS_IS = (
    torch.Tensor.detach,
    torch.Tensor.requires_grad_,
    torch.Tensor.__deepcopy__,
    torch.Tensor.clone,
    # questions about the shape, answered from the wrapper's metadata, never by unpacking the tiles
    torch.Tensor.numel,
    torch.Tensor.nelement,
    torch.Tensor.size,
    torch.Tensor.dim,
    torch.Tensor.element_size,
)


def _dense(t):
    return t.dense() if isinstance(t, PackedWeight) else t


def _linear(x, weight, bias=None):
    if (
        not isinstance(weight, PackedWeight)
        or isinstance(x, PackedWeight)
        or x.dtype is not torch.bfloat16
        or x.device.type != "cpu"
        or (torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)))
    ):
        return None
    n, k = weight.shape
    rows = x.numel() // k if k else 0
    return kernels.tile_linear(x, weight.packed, n, k, bias, choice(torch.bfloat16).member(rows))


def _embedding(ids, weight, padding_idx=None, max_norm=None, *args, **kwargs):
    if not isinstance(weight, PackedWeight) or max_norm is not None:
        return None
    if torch.is_grad_enabled() and weight.requires_grad:
        return None
    flat = weight.rows(ids.reshape(-1))
    return flat.view(*ids.shape, weight.shape[1])


def pack(weight: torch.Tensor) -> PackedWeight:
    """``weight`` (bf16 ``[N, K]`` on the CPU) as a :class:`PackedWeight`, its tiles in huge pages."""
    n, k = weight.shape
    out = kernels.empty_in_huge_pages(kernels.tile_elements(n, k), torch.bfloat16)
    return PackedWeight(kernels.pack_tiles(weight, out), (n, k))
