"""A CPU stand-in for CUDA graphs, so that the GPU path's capture and replay run (and fail) in CI.

``torch.cuda``'s graph API, emulated with the semantics that decide correctness:

- the warm-up a caller runs before capturing really runs (it is ordinary code);
- capture *records* the work (every aten operation, through a ``TorchDispatchMode``) and leaves no
  trace: whatever the captured code wrote into tensors that existed before the capture is put back;
- a replay re-runs the recorded operations, not the Python that issued them, reading the current
  contents of the tensors the capture used (its static buffers, the model's weights), so a Python-side
  change (a reassigned attribute, a branch taken differently) does not reach a replay, as on a GPU;
- a tensor the capture used that was freed, reallocated or resized since is an error at replay (CUDA
  would read or write freed memory): each is checked by weak reference, storage pointer and shape;
- tensors the capture allocated hold garbage (NaN) until the first replay, and each replay's results,
  as on a GPU where they live in the graph's memory pool and every replay overwrites them;
- a host sync (``.item()``, ``.tolist()``, ``.cpu()``, ``.numpy()``, ``nonzero``, boolean masks, ``unique``,
  ``equal``) inside a capture is an error, as on a GPU.

What it does not model: streams and devices (a CPU tensor inside a CUDA graph), memory shared between
graphs of one pool, and capture errors raised by other threads.

Switched on by ``CLASP_EMULATE_CUDA_GRAPHS=1``: the graph runner then captures on the CPU through
:data:`API` exactly as it does on CUDA through ``torch.cuda``. The same objects stand in for
``torch.cuda.CUDAGraph``, ``torch.cuda.graph``, ``torch.cuda.Stream``, ``torch.cuda.stream`` and
``torch.cuda.current_stream``, with their names, for code written against ``torch.cuda``.
"""

from __future__ import annotations

import contextlib
import os
import types
import weakref
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map


class GraphError(RuntimeError):
    """What a GPU would have done wrong (or refused) with this capture or replay."""


def enabled() -> bool:
    """Whether ``CLASP_EMULATE_CUDA_GRAPHS=1`` asks CPU models to capture through the stand-in."""
    return os.environ.get("CLASP_EMULATE_CUDA_GRAPHS", "0") == "1"


@dataclass(frozen=True)
class _Produced:
    """A tensor the capture itself made: output ``index`` of record ``record``."""

    record: int
    index: int


class _Used:
    """A tensor that existed before the capture (a static buffer, a weight): held weakly, with the storage
    and geometry the capture saw."""

    def __init__(self, t: torch.Tensor) -> None:
        self.ref = weakref.ref(t)
        self.meta = self._meta(t)
        self.what = f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}"

    @staticmethod
    def _meta(t: torch.Tensor) -> tuple:
        return (t.untyped_storage().data_ptr(), tuple(t.shape), tuple(t.stride()), t.storage_offset())

    def get(self) -> torch.Tensor:
        t = self.ref()
        if t is None:
            raise GraphError(
                f"a {self.what} tensor this graph captured was freed since the capture: on a GPU the replay "
                "would read or write freed memory (keep captured buffers alive and in place)"
            )
        if self._meta(t) != self.meta:
            raise GraphError(
                f"a {self.what} tensor this graph captured was reallocated or resized since the capture (now "
                f"{tuple(t.shape)}): on a GPU the replay would use the old memory"
            )
        return t


@dataclass
class _Record:
    func: object
    args: tuple
    kwargs: dict
    out_spec: object
    outputs: int


def _written(func, args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """The tensors ``func`` writes into (in-place and ``out=`` arguments), from its schema."""
    schema = getattr(func, "_schema", None)
    if schema is None:
        return []
    out = []
    for i, a in enumerate(schema.arguments):
        if a.alias_info is None or not a.alias_info.is_write:
            continue
        value = args[i] if i < len(args) else kwargs.get(a.name)
        out += [v for v in tree_flatten(value)[0] if isinstance(v, torch.Tensor)]
    return out


_SYNCING = {
    torch.ops.aten._local_scalar_dense.default,
    torch.ops.aten.nonzero.default,
    torch.ops.aten.masked_select.default,
    torch.ops.aten.equal.default,
    torch.ops.aten.is_nonzero.default,
    torch.ops.aten._unique2.default,
    torch.ops.aten.unique_consecutive.default,
    torch.ops.aten.unique_dim.default,
}
"""Operations whose result size or value needs the device's data on the host: illegal in a capture."""


def _host_read(name: str):
    def refuse(self, *args, **kwargs):
        raise GraphError(f"a host sync (Tensor.{name}) inside a graph capture")

    return refuse


class _Recorder(TorchDispatchMode):
    """Records every operation of a capture; puts back what it wrote into tensors made before it."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[_Record] = []
        self.produced: dict[int, _Produced] = {}
        self.keep: list[torch.Tensor] = []  # the capture's own tensors stay alive (their ids stay unique)
        self.fresh: set[int] = set()  # storages the capture allocated
        self.saved: dict[int, tuple[torch.UntypedStorage, torch.UntypedStorage]] = {}

    def _ref(self, x):
        if not isinstance(x, torch.Tensor):
            return x
        return self.produced.get(id(x)) or _Used(x)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _SYNCING or (func is torch.ops.aten.index.Tensor and _bool_index(args)):
            raise GraphError(f"a host sync ({func}) inside a graph capture")
        for t in _written(func, args, kwargs):
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in self.fresh and ptr not in self.saved:
                self.saved[ptr] = (storage, storage.clone())
        out = func(*args, **kwargs)
        inputs = {id(a) for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)}
        in_storages = {
            a.untyped_storage().data_ptr() for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)
        }
        flat, spec = tree_flatten(out)
        record = _Record(func, tree_map(self._ref, args), tree_map(self._ref, kwargs), spec, len(flat))
        for i, t in enumerate(flat):
            if isinstance(t, torch.Tensor) and id(t) not in inputs:  # in-place results are their inputs
                self.produced[id(t)] = _Produced(len(self.records), i)
                self.keep.append(t)
                if t.untyped_storage().data_ptr() not in in_storages:
                    self.fresh.add(t.untyped_storage().data_ptr())
        self.records.append(record)
        return out

    def undo(self) -> None:
        """Put back every tensor made before the capture that it wrote (a capture runs nothing), and fill
        what it allocated with NaN (garbage until a replay writes it)."""
        for storage, copy in self.saved.values():
            storage.copy_(copy)
        self.saved.clear()
        for t in self.results():
            if t.is_floating_point():
                t.fill_(float("nan"))

    def results(self) -> list[torch.Tensor]:
        """The tensors the capture allocated (not views of something else), which replays overwrite."""
        return [t for t in self.keep if t._base is None and t.untyped_storage().data_ptr() in self.fresh]


def _bool_index(args) -> bool:
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in tree_flatten(args[1:])[0])


class CUDAGraph:
    """Stands in for ``torch.cuda.CUDAGraph``: filled by :class:`graph`, run by :meth:`replay`."""

    def __init__(self) -> None:
        self.records: list[_Record] | None = None
        self._keep: list[torch.Tensor] = []
        self._outputs: list[tuple[int, int, torch.Tensor]] = []  # (record, output, the capture's tensor)
        self._pool = object()

    def replay(self) -> None:
        if self.records is None:
            raise GraphError("replay of a graph that was never captured")
        results: list[list] = []

        def resolve(x):
            if isinstance(x, _Produced):
                return results[x.record][x.index]
            if isinstance(x, _Used):
                return x.get()
            return x

        with torch.inference_mode(torch.is_inference_mode_enabled()):
            for r in self.records:
                out = r.func(*tree_map(resolve, r.args), **tree_map(resolve, r.kwargs))
                flat, _ = tree_flatten(out)
                results.append(flat)
            for record, index, captured in self._outputs:  # the pool's memory now holds this replay's values
                captured.copy_(results[record][index])

    def pool(self):
        return self._pool

    def reset(self) -> None:
        self.records = None
        self._keep = []
        self._outputs = []


class graph:
    """Stands in for ``torch.cuda.graph``: ``with graph(g, pool=...):`` captures into ``g``."""

    def __init__(self, cuda_graph: CUDAGraph, pool=None, stream=None, capture_error_mode: str = "global") -> None:
        self.cuda_graph = cuda_graph
        self.recorder = _Recorder()

    def __enter__(self) -> CUDAGraph:
        self.patched = {n: getattr(torch.Tensor, n) for n in ("tolist", "numpy", "cpu", "item")}
        for name in self.patched:
            setattr(torch.Tensor, name, _host_read(name))
        self.recorder.__enter__()
        return self.cuda_graph

    def __exit__(self, *exc) -> None:
        self.recorder.__exit__(*exc)
        for name, method in self.patched.items():
            setattr(torch.Tensor, name, method)
        self.recorder.undo()
        if exc[0] is None:
            g = self.cuda_graph
            g.records, g._keep = self.recorder.records, self.recorder.keep
            results = {id(t) for t in self.recorder.results()}
            g._outputs = [
                (p.record, p.index, t)
                for t in self.recorder.keep
                if id(t) in results
                for p in [self.recorder.produced[id(t)]]
            ]


class Stream:
    """Stands in for ``torch.cuda.Stream``: one CPU stream, nothing to wait for."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def wait_stream(self, other) -> None:
        pass

    def synchronize(self) -> None:
        pass


def stream(s: Stream | None = None):
    """Stands in for ``torch.cuda.stream``."""
    return contextlib.nullcontext()


def current_stream(device=None) -> Stream:
    """Stands in for ``torch.cuda.current_stream``."""
    return Stream()


def synchronize(device=None) -> None:
    """Stands in for ``torch.cuda.synchronize``."""


API = types.SimpleNamespace(
    CUDAGraph=CUDAGraph,
    graph=graph,
    Stream=Stream,
    stream=stream,
    current_stream=current_stream,
    synchronize=synchronize,
)
"""The stand-in, shaped like the part of ``torch.cuda`` the graph runner uses."""


@contextlib.contextmanager
def patched_torch_cuda():
    """``torch.cuda``'s graph API replaced by the stand-in (for code that calls ``torch.cuda`` directly)."""
    names = ("CUDAGraph", "graph", "Stream", "stream", "current_stream", "synchronize")
    saved = {n: getattr(torch.cuda, n) for n in names}
    try:
        for n in names:
            setattr(torch.cuda, n, getattr(API, n))
        yield
    finally:
        for n, v in saved.items():
            setattr(torch.cuda, n, v)
