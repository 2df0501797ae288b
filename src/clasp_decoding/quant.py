"""Cheap drafts: weight-only int8 / int4 copies of the layers (and the draft head) the draft runs.

A layer-skip draft step reads the weights of every layer it keeps, so on a CPU (and for small batches
anywhere) its cost is the bytes it reads. Quantized copies of those weights make it 2-4x cheaper to read;
verification always runs the model's own weights, so the output is unchanged (the draft only proposes).

Kernels: on the CPU, the project's own (:mod:`.kernels`: int8 per output channel, int4 in groups, read
once per call, row-invariant); elsewhere torch's weight-only operators, ``torch._weight_int8pack_mm``
(int8, per output channel) and ``torch._weight_int4pack_mm`` (int4, grouped), behind one small module. Why not torchao: with the pinned torch, torchao's ``Int8WeightOnlyConfig`` measured
slower than plain bf16 on a CPU without AMX (3.8 ms against 1.9 ms for one row of a 1536 -> 8960 layer;
``../shared/docs/environment.md``), while ``_weight_int8pack_mm`` was 3x faster; these operators are what
torchao's CPU path lowers to anyway, without its extra dependency. Where a device has no fused kernel
(checked once per device) the module falls back to dequantizing on the fly, which is correct but not
faster: the measured costs then tell the controller that quantized drafts do not pay there.

Activations go through the kernels in bf16 (the int8 kernel with fp32 activations is 10x slower on the
CPUs measured), and come back in the model's dtype.
"""

from __future__ import annotations

import copy
import functools

import torch
from torch import nn

from . import kernels
from .draft_head import VocabSubset

INT4_GROUPS = (128, 64, 32)


def _own_kernels(device: torch.device) -> bool:
    """Whether the project's kernels (:mod:`.kernels`) run quantized layers on this device: the CPU, built."""
    return device.type == "cpu" and kernels.available()


@functools.cache
def fused_available(kind: str, device_type: str) -> bool:
    """Whether a fused weight-only kernel exists for ``kind`` on ``device_type``: the project's own on the
    CPU, else torch's (tried once)."""
    if _own_kernels(torch.device(device_type)):
        return True
    try:
        layer = nn.Linear(256, 64, bias=False).to(device_type)
        QuantLinear(layer, kind, _probe=True)(torch.randn(2, 256, device=device_type))
        return True
    except (RuntimeError, NotImplementedError, AttributeError):
        return False


class QuantLinear(nn.Module):
    """A weight-only quantized copy of an ``nn.Linear`` (the original is left untouched).

    On the CPU with the project's kernels: int8 per output channel, or int4 in groups of 128 (64) inputs,
    run by :func:`.kernels.linear_int8` / :func:`.kernels.linear_int4`. Elsewhere torch's fused operators,
    or, where none exists, dequantization on every call (correct, not faster)."""

    def __init__(self, linear: nn.Linear, kind: str, *, fused: bool | None = None, _probe: bool = False) -> None:
        super().__init__()
        weight = linear.weight.detach()
        self.kind, self.out_features, self.in_features = kind, weight.shape[0], weight.shape[1]
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())
        dev = weight.device
        self.own = not _probe and _own_kernels(dev)
        if self.own and kind == "int8":
            from .cpu_linear import int8_prefetch

            int8_prefetch()  # measured once per machine, applied to the kernel
        if kind == "int4" and self.own:
            self.group = next((g for g in INT4_GROUPS if g % 64 == 0 and self.in_features % g == 0), None)
        elif kind == "int4":
            self.group = next((g for g in INT4_GROUPS if self.in_features % g == 0), None)
        if kind == "int4" and (
            self.group is None or (not self.own and (self.out_features % 16 or self.in_features % 32))
        ):
            self.kind = kind = "int8"  # a shape the int4 kernels do not take: int8 for this layer
        self.fused = self.own or _probe or (fused if fused is not None else fused_available(kind, dev.type))
        # The project's kernels: quantized slice by slice of rows, straight into huge pages (no full fp32
        # copy of the weight, which for a vocabulary head is three times its size).
        if kind == "int8":
            q, scale = kernels.quantize_int8(weight, huge_pages=self.own)
            self.register_buffer("qweight", q)
            self.register_buffer("scale", scale if self.own else scale.to(torch.bfloat16))
        elif kind == "int4" and self.own:
            packed, scale, zero = kernels.pack_int4(weight, self.group, huge_pages=True)
            self.register_buffer("qweight", packed)
            self.register_buffer("scale", scale)
            self.register_buffer("zero", zero)
        elif kind == "int4":
            w = weight.float()
            grouped = w.view(self.out_features, -1, self.group)
            lo, hi = grouped.amin(-1, keepdim=True), grouped.amax(-1, keepdim=True)
            scale = (hi - lo).clamp_min(1e-8) / 15
            zero = lo + 8 * scale  # torch's packed kernels' convention: w = (q - 8) * scale + zero
            q = ((grouped - lo) / scale).round().clamp(0, 15).to(torch.int32).view(self.out_features, -1)
            pairs = torch.stack([scale.squeeze(-1), zero.squeeze(-1)], -1).transpose(0, 1).contiguous()
            self.register_buffer("scales_zeros", pairs.to(torch.bfloat16))
            # Packed for the fused kernel, or one value per byte for the fallback's dequantization.
            self.register_buffer("qweight", self._pack(q, dev) if self.fused else q.to(torch.uint8))
        else:
            raise ValueError(f"unknown quantization {kind!r}")

    @staticmethod
    def _pack(q: torch.Tensor, dev: torch.device) -> torch.Tensor:
        if dev.type == "cpu":
            return torch._convert_weight_to_int4pack_for_cpu(q, 2)
        packed = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
        k = q.shape[1]  # the CUDA packing needs K a multiple of 16 * inner_k_tiles
        tiles = next(t for t in (8, 4, 2) if k % (16 * t) == 0)
        return torch._convert_weight_to_int4pack(packed, tiles)

    def dequantized(self) -> torch.Tensor:
        """The weights the fallback path computes with, as bf16."""
        if self.kind == "int8":
            return (self.qweight.float() * self.scale.float()[:, None]).bfloat16()
        if self.own:
            return kernels.unpack_int4(self.qweight, self.scale, self.zero, self.group).bfloat16()
        sz = self.scales_zeros.float()  # [groups, out, 2]
        q = self.qweight.float().view(self.out_features, -1, self.group)
        w = (q - 8) * sz[..., 0].T[..., None] + sz[..., 1].T[..., None]
        return w.view(self.out_features, self.in_features).bfloat16()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1]).to(torch.bfloat16).contiguous()
        if self.own and flat.device.type == "cpu":
            if self.kind == "int8":
                out = kernels.linear_int8(flat, self.qweight, self.scale, self.bias)
            else:
                out = kernels.linear_int4(flat, self.qweight, self.scale, self.zero, self.group, self.bias)
            return out.to(x.dtype).view(*shape[:-1], self.out_features)
        if not self.fused:
            out = torch.nn.functional.linear(flat, self.dequantized().to(flat.device))
        elif self.kind == "int8":
            out = torch._weight_int8pack_mm(flat, self.qweight, self.scale)
        elif flat.device.type == "cpu":
            out = torch._weight_int4pack_mm_for_cpu(flat, self.qweight, self.group, self.scales_zeros)
        else:
            out = torch._weight_int4pack_mm(flat, self.qweight, self.group, self.scales_zeros)
        out = out.to(x.dtype)
        if self.bias is not None:
            out = out + self.bias
        return out.view(*shape[:-1], self.out_features)


def resolve(kind: str, device: torch.device, sample: nn.Linear | None = None) -> str:
    """The draft quantization ``kind`` means on ``device``. ``auto``: on the CPU, int8 where a fused
    kernel exists (the project's, or torch's: half the bytes of bf16 per draft step; measured on the
    benchmark model, draft steps 0.50 -> 0.38 of a full step, acceptance 77% -> 75%: docs/tuning.md);
    on a GPU, whichever of int4 (torch's ``_weight_int4pack_mm``) and int8 a timing of ``sample`` (one of
    the model's own linear layers) shows faster than the layer as it is, by 10% at least, else none."""
    if kind != "auto":
        return kind
    dev = torch.device(device)
    if dev.type == "cpu":
        return "int8" if fused_available("int8", "cpu") else "none"
    if sample is None:
        return "none"
    key = (str(dev), tuple(sample.weight.shape), sample.weight.dtype)
    if key not in _FASTEST:
        _FASTEST[key] = _fastest_on(str(dev), sample)
    return _FASTEST[key]


_FASTEST: dict[tuple, str] = {}  # per device and layer shape: timed once per process


def _fastest_on(device: str, sample: nn.Linear) -> str:
    """Time one-row calls of ``sample`` as it is and of its int4 and int8 copies on ``device``."""
    from .costs import median_seconds

    weight, bias = sample.weight, sample.bias
    x = torch.randn(1, weight.shape[1], device=weight.device, dtype=weight.dtype)

    def timed(fn) -> float:
        def call() -> None:
            for _ in range(20):
                fn(x)
            torch.cuda.synchronize(weight.device)

        return median_seconds(call, repeats=5)

    with torch.inference_mode():
        # the layer as torch runs it (not through its module: hooks installed on it would pad rows)
        base = timed(lambda t: torch.nn.functional.linear(t, weight, bias))
        best, best_time = "none", base / 1.1
        for kind in ("int4", "int8"):
            try:
                if not fused_available(kind, torch.device(device).type):
                    continue
                seconds = timed(QuantLinear(sample, kind))
            except (RuntimeError, NotImplementedError):
                continue
            if seconds < best_time:
                best, best_time = kind, seconds
    return best


def sample_layer(runner) -> nn.Linear | None:
    """The largest linear layer of the first decoder layer: what :func:`resolve` times on a GPU. Sized by
    its declared features: reading ``weight`` of a layer whose weights the CPU kernels hold packed would
    unpack them (tens of milliseconds per generation)."""
    linears = [m for m in runner.layers[0].modules() if isinstance(m, nn.Linear)]
    return max(linears, key=lambda m: m.in_features * m.out_features, default=None)


def quantized_copy(module: nn.Module, kind: str) -> nn.Module:
    """A shallow copy of ``module`` whose ``nn.Linear`` descendants are :class:`QuantLinear` copies; every
    other submodule, parameter and buffer is shared (so norms, rotary tables and the attention's cache
    index stay the layer's own)."""
    clone = copy.copy(module)
    clone.__dict__.pop("forward", None)  # a dispatch hook's bound forward would run the original
    clone._modules = {}
    for name, child in module._modules.items():
        if isinstance(child, nn.Linear):
            clone._modules[name] = QuantLinear(child, kind)
        elif child is not None and any(isinstance(m, nn.Linear) for m in child.modules()):
            clone._modules[name] = quantized_copy(child, kind)
        else:
            clone._modules[name] = child
    return clone


class QuantizedHead(VocabSubset):
    """The draft head over ``[0, limit)`` (quantized, made once per model) plus the prompt's extra ids
    (few: kept in the model's dtype)."""

    def __init__(self, base: VocabSubset, block: QuantLinear) -> None:
        self.__dict__.update(base.__dict__)
        self.block = block

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        out = self.block(hidden)
        if self.extra_weight is not None:
            out = torch.cat([out, torch.nn.functional.linear(hidden, self.extra_weight, self.extra_bias)], dim=-1)
        return out


def draft_modules(model_state, kind: str, vocab: VocabSubset | None) -> tuple[list[nn.Module], VocabSubset]:
    """Quantized copies of every layer (made once per model and kind: any layer may be kept by a skip
    set) and a quantized draft head for ``vocab`` (the whole head when ``vocab`` is ``None``)."""
    runner = model_state.runner

    def make_layers() -> list[nn.Module]:
        out = [quantized_copy(layer, kind) for layer in runner.layers]
        for layer in out:
            layer.clasp_variant = kind  # names these stand-ins (the graph runner keys its graphs by it)
        kernels.trim_memory()
        return out

    layers = model_state.remember(("draft_layers", kind), make_layers)
    base = vocab or VocabSubset(runner.head, runner.vocab_size)
    limit = base.weight.shape[0]

    def make_block() -> QuantLinear:
        head = nn.Linear(base.weight.shape[1], limit, bias=base.bias is not None, device="meta")  # no allocation
        head.weight = nn.Parameter(base.weight, requires_grad=False)
        head.bias = None if base.bias is None else nn.Parameter(base.bias, requires_grad=False)
        block = QuantLinear(head, kind)
        kernels.trim_memory()
        return block

    block = model_state.remember(("draft_head", kind, limit), make_block)
    return layers, QuantizedHead(base, block)


def extra_bytes(modules: list[nn.Module]) -> int:
    """Bytes the quantized copies add (their own buffers only: shared weights are not counted)."""
    seen, total = set(), 0
    for module in modules:
        for m in module.modules():
            if isinstance(m, QuantLinear):
                for buf in m.buffers():
                    if id(buf) not in seen:
                        seen.add(id(buf))
                        total += buf.numel() * buf.element_size()
    return total
