"""The GPU fast path: static shapes and per-layer CUDA graphs behind the runner's interface.

Eager PyTorch on a GPU is bound by kernel launches, so CLaSp's savings (fewer layers per draft step)
only show when launches are gone. Here every hot call is a sequence of graph replays over static
buffers:

- an *entry* graph per query bucket ``q``: embedding, rotary tables, positions, cache slots and masks;
- a graph per decoder layer and bucket, all reading and writing one hidden-state buffer, so a draft
  with any skip set is just the replays of the layers it keeps (a quantized draft's stand-in layers
  have graphs of their own, keyed by their variant: int8 and int4 never share one);
- an *exit* graph per bucket and kind: final norm and head of the last row (a draft step) or of every
  row (a verification), each writing a logits buffer of its own that is never reallocated;
- per-layer graphs for the DP's candidate calls (one bucket of ``max_candidates`` rows; more candidates
  run in several calls, so any layer count and skip count works).

Buckets go up to :data:`BUCKETS`' largest (64 rows): the loop never verifies more rows than that in one
call (:attr:`GraphRunner.max_rows`), so lookup drafts and the cost ladder always replay graphs. A prompt
longer than the largest bucket runs the same static code eagerly, once.

Every graph is captured up front (:meth:`GraphRunner.prepare`, called by ``use_graphs`` and, for a
quantized draft's layers, when they are made), never inside a timed round: a capture synchronizes the
device and empties the allocator's cache, which would corrupt the costs the controller measures. A
capture after warm-up restores the hidden-state buffer the warm-up wrote, so a graph's first replay
computes from the same input as every later one.

The cache (:class:`StaticKVCache`) is allocated once at full capacity and written with ``index_copy_``
at slots held in a device tensor; attention reads all slots and masks the ones beyond each query.
Because attention is one batched call over all slots, verification is not bit-identical to one-token
decoding here (the numerics report says so): greedy output matches plain decoding except where two
tokens tie to within rounding. The one static cache serves one live generation at a time; a second
concurrent one is refused with :class:`~.errors.RunnerBusyError`.

Graphs are captured with ``torch.cuda`` on a GPU, with the CPU stand-in of :mod:`.graph_emulation`
when ``CLASP_EMULATE_CUDA_GRAPHS=1`` (the tests), and not at all with ``capture=False``, which runs the
same static-shape code eagerly.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import replace

import torch
from torch import nn

from . import graph_emulation
from .draft_head import VocabSubset
from .errors import InputError, RunnerBusyError
from .kv_cache import KVCache
from .runner import AS_GIVEN, ModelRunner

BUCKETS = (1, 2, 4, 8, 16, 32, 64)
"""Rows per call that have graphs: a call of ``q`` rows replays the smallest bucket that holds it."""


class StaticKVCache(KVCache):
    """Full-capacity buffers written at the slots in ``slot_index`` (a device tensor), read whole."""

    def __init__(self, num_layers: int, capacity: int, dtype, device) -> None:
        super().__init__(num_layers, capacity, dtype)
        self.device = torch.device(device)
        self.slot_index: torch.Tensor | None = None

    def _allocate(self, layer_idx: int, key_states: torch.Tensor, value_states: torch.Tensor):
        b, h, _, d = key_states.shape
        dv = value_states.shape[-1]
        keys = torch.zeros(b, h, self.capacity, d, dtype=self.dtype, device=self.device)
        values = torch.zeros(b, h, self.capacity, dv, dtype=self.dtype, device=self.device)
        self.keys[layer_idx], self.values[layer_idx] = keys, values
        return keys, values

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        keys = self.keys[layer_idx]
        if keys is None:
            keys, values = self._allocate(layer_idx, key_states, value_states)
        else:
            values = self.values[layer_idx]
        n = key_states.shape[-2]
        keys.index_copy_(2, self.slot_index[:n], key_states)
        values.index_copy_(2, self.slot_index[:n], value_states)
        return keys, values


class _Bucket:
    """Static buffers for calls of up to ``size`` query rows. ``states`` holds every layer's hidden
    states (``rows`` of them: all, or only the last one for a long prompt's prefill)."""

    def __init__(
        self,
        runner: GraphRunner,
        size: int,
        with_states: bool = True,
        state_rows: int | None = None,
        exits: bool = True,
    ) -> None:
        d = runner.config.hidden_size
        dev, dt = runner.device, runner.dtype
        self.size = size
        self.tokens = torch.zeros(size, dtype=torch.long, device=dev)
        self.positions = torch.zeros(1, size, dtype=torch.long, device=dev)
        self.slots = torch.zeros(size, dtype=torch.long, device=dev)
        self.offsets = torch.arange(size, device=dev)
        self.hidden = torch.zeros(1, size, d, dtype=dt, device=dev)
        self.state_rows = size if state_rows is None else state_rows
        self.states = (
            torch.zeros(runner.num_layers + 1, self.state_rows, d, dtype=dt, device=dev) if with_states else None
        )
        self.masks = {
            k: torch.zeros(1, 1, size, runner.capacity, dtype=dt, device=dev) for k in set(runner.layer_types)
        }
        self.pe: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        # One logits buffer per exit kind, allocated once: a graph writes the buffer it was captured with.
        vocab = runner.vocab_size if exits else 0
        self.logits_last = torch.zeros(1, vocab, dtype=torch.float32, device=dev)
        self.logits_all = torch.zeros(size, vocab, dtype=torch.float32, device=dev) if size > 1 else self.logits_last

    def keep_state(self, h: torch.Tensor) -> torch.Tensor:
        """The rows of ``h`` ``[size, d]`` that ``states`` keeps."""
        return h if self.state_rows == self.size else h[self.size - self.state_rows :]


def variant(module: nn.Module | None):
    """The graph-key name of a stand-in layer: its quantization (``int8``, ``int4``), else its identity."""
    if module is None:
        return None
    return getattr(module, "clasp_variant", None) or id(module)


class GraphRunner(ModelRunner):
    """A :class:`ModelRunner` whose calls replay CUDA graphs over static buffers (see module doc)."""

    def __init__(
        self,
        model,
        capacity: int = 4096,
        *,
        buckets: Sequence[int] = BUCKETS,
        max_candidates: int = 32,
        capture: bool | None = None,
        compile_layers: bool = False,
    ) -> None:
        super().__init__(model)
        if not self.single_device:
            raise InputError(
                "The graph runner needs the whole model on one device; a model placed over several devices runs "
                "on the eager runner (use_graphs picks it for such a model)."
            )
        self.buckets = tuple(sorted(set(buckets)))
        self.max_rows = self.buckets[-1]
        self.max_candidates = max_candidates
        self.token_capacity = min(self.max_positions, capacity)
        self.capacity = -(-(self.token_capacity + self.scratch_slots()) // 16) * 16  # attention pads to 16 slots
        if capture is None:
            capture = (torch.cuda.is_available() and self.device.type == "cuda") or (
                graph_emulation.enabled() and self.device.type == "cpu"
            )
        self.capture = capture
        self.api = graph_emulation.API if self.device.type == "cpu" else torch.cuda
        self.cache = StaticKVCache(self.num_layers, self.capacity, self.dtype, self.device)
        self._owner = None  # the live generation's cache, if any
        self.start = torch.zeros((), dtype=torch.long, device=self.device)
        self.kv_slots = torch.arange(self.capacity, device=self.device)
        self._buckets = {b: _Bucket(self, b) for b in self.buckets}
        self._cand = _Bucket(self, max_candidates, with_states=False, exits=False)
        self._graphs: dict[tuple, Callable[[], None]] = {}
        self._pool = None
        self.late_captures = 0  # graphs captured outside prepare(): each one a stall inside a round
        self._preparing = False
        self._prepared: set = set()
        self._layer_fns = list(self.layers)
        self._compile = compile_layers
        if compile_layers:
            from torch import _dynamo

            # Every layer shares one code object: let dynamo keep a compiled variant per layer and shape
            # (the limits' names changed across torch versions: raise whichever exist).
            for name in (
                "cache_size_limit",
                "recompile_limit",
                "accumulated_cache_size_limit",
                "accumulated_recompile_limit",
            ):
                if hasattr(_dynamo.config, name):
                    setattr(_dynamo.config, name, max(getattr(_dynamo.config, name), 16 * self.num_layers))
            self._layer_fns = [torch.compile(layer, dynamic=False) for layer in self.layers]
        if self.numerics.exact:
            warnings.warn(
                "The graph runner attends all cache slots in one batched call, so verification is not "
                "bit-identical to one-token decoding; greedy output equals plain decoding's except where two "
                "tokens tie to within rounding.",
                stacklevel=2,
            )
        self.numerics = replace(self.numerics, attention_rowwise=False)
        self.row_exact = False

    def scratch_slots(self) -> int:
        """Slots beyond the verified tokens: a verification padded to the largest bucket, or one chunk of
        layer-selection candidates."""
        return max(self.buckets[-1], getattr(self, "max_candidates", 0)) + 2

    def check_fits(self, prompt_len: int, max_new_tokens: int) -> None:
        """The model's context rule, and the static cache's: prompt + new tokens within ``capacity``."""
        super().check_fits(prompt_len, max_new_tokens)
        if prompt_len + max_new_tokens > self.token_capacity:
            raise InputError(
                f"The prompt ({prompt_len} tokens) plus max_new_tokens ({max_new_tokens}) exceeds this runner's "
                f"static cache of {self.token_capacity} tokens (CLASP_GRAPH_CAPACITY); ask for at most "
                f"{max(0, self.token_capacity - prompt_len)} new tokens."
            )

    def new_cache(self, prompt_len: int, max_new_tokens: int) -> KVCache:
        """The one static cache, emptied (graphs hold its buffers, so it is never reallocated). It belongs
        to one live generation until :meth:`release_cache`."""
        self.check_fits(prompt_len, max_new_tokens)
        if self._owner is not None:
            raise RunnerBusyError(
                "This model's graph runner already serves a live generation (its one static cache is in use); "
                "finish or close that generation first, or run the model through the eager runner."
            )
        self._owner = self.cache
        self.cache.rollback(0)
        return self.cache

    def release_cache(self, cache: KVCache) -> None:
        if cache is self.cache:
            self._owner = None

    # ------------------------------------------------------------------ capturing up front

    def _on_device(self):
        """The model's GPU as the current one: streams, captures and replays belong to the current device."""
        import contextlib

        return torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()

    @torch.inference_mode()
    def prepare(self, modules: Sequence[nn.Module] | None = None) -> int:
        """Capture every graph a generation can replay (with ``modules``: the graphs of those stand-in
        layers, a quantized draft's), outside any timed round. The capture calls write only scratch slots
        past the token capacity, so a live generation's cache is untouched. Python's garbage collector is
        paused meanwhile (a collection freeing CUDA objects during a capture invalidates it). Returns how
        many graphs were new."""
        import gc

        before = len(self._graphs)
        what = None if modules is None else variant(modules[0])
        if not self.capture or what in self._prepared:
            return 0
        self._preparing = True
        scratch = self.token_capacity  # graphs do not depend on the position: use slots no token owns
        hidden = torch.zeros(1, self.config.hidden_size, device=self.device, dtype=self.dtype)
        gc.collect()
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            if modules is None:
                for size in self.buckets:
                    tokens = torch.zeros(size, dtype=torch.long, device=self.device)
                    for last_only, collect in ((True, False), (False, False), (False, True)):
                        self.forward(self.cache, tokens, scratch, last_only=last_only, collect_hidden=collect)
                for i in self.all_layers:
                    self.layer_candidates(self.cache, i, hidden, scratch)
            else:  # a draft's steps: one row, its last logits; and the DP's candidates through its layers
                tokens = torch.zeros(1, dtype=torch.long, device=self.device)
                self.forward(self.cache, tokens, scratch, last_only=True, modules=modules)
                for i in self.all_layers:
                    self.layer_candidates(self.cache, i, hidden, scratch, modules[i])
            self._prepared.add(what)
        finally:
            self._preparing = False
            if was_enabled:
                gc.enable()
        return len(self._graphs) - before

    # ------------------------------------------------------------------ the static steps

    def _entry(self, b: _Bucket, candidates: bool) -> Callable[[], None]:
        """Positions, slots, masks and rotary tables from ``self.start``; embeddings unless candidates."""

        def run() -> None:
            kv = self.kv_slots
            if candidates:
                b.positions.copy_(self.start.expand(1, b.size))
                b.slots.copy_(self.start + 1 + b.offsets)
                allowed = (kv[None, :] < self.start) | (kv[None, :] == b.slots[:, None])
                kv_pos = torch.where(kv > self.start, self.start, kv)
            else:
                b.positions.copy_((self.start + b.offsets)[None])
                b.slots.copy_(b.positions[0])
                allowed = kv[None, :] <= b.slots[:, None]
                kv_pos = kv
                h = self._embed(b.tokens.view(1, b.size))
                b.hidden.copy_(h)
                if b.states is not None:
                    b.states[0].copy_(b.keep_state(h[0]))
            q_pos = b.positions[0]
            for kind, mask in b.masks.items():
                ok = allowed
                if kind == "sliding_attention" and self.sliding_window is not None:
                    ok = ok & (kv_pos[None, :] > q_pos[:, None] - self.sliding_window)
                mask.copy_(torch.where(ok, 0.0, self._neg)[None, None].to(mask.dtype))
            pe = self._rotary(b.hidden, b.positions)
            for kind, (cos, sin) in pe.items():
                if kind not in b.pe:
                    b.pe[kind] = (torch.empty_like(cos), torch.empty_like(sin))
                b.pe[kind][0].copy_(cos)
                b.pe[kind][1].copy_(sin)

        return run

    def _layer(self, b: _Bucket, i: int, collect: bool, module: nn.Module | None = None) -> Callable[[], None]:
        kind = self.layer_types[i]
        fn = module if module is not None else self._layer_fns[i]
        if module is not None and self._compile:
            fn = torch.compile(module, dynamic=False)

        def run() -> None:
            self.cache.slot_index = b.slots
            out = fn(
                b.hidden,
                attention_mask=b.masks[kind],
                position_embeddings=b.pe[kind],
                position_ids=b.positions,
                **{self._cache_kw: self.cache},
                **({"clasp_rows": AS_GIVEN} if self.wrapped_attention else {}),  # its own masks, as given
            )
            out = out[0] if isinstance(out, tuple) else out
            b.hidden.copy_(out)
            if collect:
                b.states[i + 1].copy_(b.keep_state(out[0]))

        return run

    def _exit(self, b: _Bucket, last: bool) -> Callable[[], None]:
        """Final norm and head: of the last row (a draft step) into ``logits_last``, or of every row (a
        verification) into ``logits_all``."""

        def run() -> None:
            if last:
                b.logits_last.copy_(self.logits(b.hidden[0, -1:]))
            else:
                b.logits_all.copy_(self.logits(b.hidden[0]))

        return run

    def _run(self, key: tuple, make: Callable[[], Callable[[], None]], b: _Bucket) -> None:
        """Run a step: eagerly, or as a graph captured on first use (after a warm-up run)."""
        fn = self._graphs.get(key)
        if fn is None:
            step = make()
            if not self.capture:
                fn = step
            else:
                if not self._preparing:
                    self.late_captures += 1
                fn = self._capture(step, b)
            self._graphs[key] = fn
        fn()

    def _capture(self, step: Callable[[], None], b: _Bucket) -> Callable[[], None]:
        """Warm up (allocations and lazy initialisation happen outside the capture), put back the hidden
        state the warm-up changed, capture."""
        api = self.api
        saved = b.hidden.clone()
        with self._on_device():
            side = api.Stream()
            side.wait_stream(api.current_stream())
            with api.stream(side):
                step()
            api.current_stream().wait_stream(side)
            b.hidden.copy_(saved)
            graph = api.CUDAGraph()
            with api.graph(graph, pool=self._pool):
                step()
        self._pool = graph.pool()
        if self.device.type != "cuda":
            return graph.replay

        def replay() -> None:
            with self._on_device():
                graph.replay()

        return replay

    def _bucket_for(self, q: int) -> _Bucket:
        for size in self.buckets:
            if size >= q:
                return self._buckets[size]
        raise ValueError(f"{q} tokens in one call exceed the largest bucket ({self.buckets[-1]})")

    # ------------------------------------------------------------------ the runner interface

    @torch.inference_mode()
    def forward(
        self,
        cache: KVCache,
        tokens: torch.Tensor,
        start: int,
        *,
        layers: Sequence[int] | None = None,
        last_only: bool = False,
        collect_hidden: bool = False,
        vocab: VocabSubset | None = None,
        modules: Sequence[nn.Module] | None = None,
    ):
        tokens = tokens.reshape(-1)
        q = tokens.shape[0]
        graphs = q <= self.buckets[-1]
        # A prompt longer than the largest bucket runs the same static steps eagerly, in one call, keeping
        # hidden states of its last row only when that is all it returns.
        b = (
            self._bucket_for(q)
            if graphs
            else _Bucket(self, q, with_states=collect_hidden, state_rows=1 if last_only else None, exits=False)
        )
        b.tokens[:q].copy_(tokens)
        if q < b.size:
            b.tokens[q:].zero_()
        self.start.fill_(start)
        run = self._run if graphs else (lambda key, make, bucket: make()())
        run(("entry", b.size), lambda: self._entry(b, candidates=False), b)
        for i in self.all_layers if layers is None else layers:
            module = modules[i] if modules is not None else None
            run(
                ("layer", b.size, i, collect_hidden, variant(module)),
                lambda i=i, m=module: self._layer(b, i, collect_hidden, m),
                b,
            )
        if vocab is not None or not graphs:  # a draft head over part of the vocabulary, a long prompt: eagerly
            logits = self.logits(b.hidden[0, q - 1 : q] if last_only else b.hidden[0, :q], vocab)
        elif last_only and q == b.size:
            run(("exit", b.size, True), lambda: self._exit(b, True), b)
            logits = b.logits_last.clone()
        else:
            run(("exit", b.size, False), lambda: self._exit(b, False), b)
            logits = b.logits_all[q - 1 : q].clone() if last_only else b.logits_all[:q].clone()
        hidden = None
        if collect_hidden:
            if not graphs:
                hidden = b.states.clone()
            else:
                hidden = b.states[:, q - 1 : q].clone() if last_only else b.states[:, :q].clone()
        return logits, hidden

    @torch.inference_mode()
    def layer_candidates(
        self, cache: KVCache, index: int, states: torch.Tensor, position: int, module: nn.Module | None = None
    ) -> torch.Tensor:
        """The DP's call for layer ``index``, in chunks of ``max_candidates`` rows (each chunk writes the
        same scratch slots: candidates never see each other)."""
        n = states.shape[0]
        if position + 1 < cache.length:
            raise ValueError(f"DP candidates at position {position} would overwrite verified cache slots")
        outs = []
        b = self._cand
        for lo in range(0, n, self.max_candidates):
            part = states[lo : lo + self.max_candidates]
            m = part.shape[0]
            b.hidden[0, :m].copy_(part)
            b.hidden[0, m:].zero_()
            self.start.fill_(position)
            self._run(("cand-entry",), lambda: self._entry(b, candidates=True), b)
            self._run(("cand", index, variant(module)), lambda: self._layer(b, index, False, module), b)
            outs.append(b.hidden[0, :m].clone())
        return torch.cat(outs) if len(outs) > 1 else outs[0]
