"""Row-exact numerics: a verification over ``q`` tokens computes, for each token, the very bits that
plain decoding computes one token at a time.

Why: greedy speculative decoding is lossless only if the verifier's logits at every position equal plain
decoding's. Floating point makes that a property of kernels, not of maths: a reduction done in another
order rounds differently, and near-ties between the two best tokens then flip. Two places differ here:

- **Attention.** ``scaled_dot_product_attention`` over ``q`` masked queries does not give the bits of
  ``q`` single-query calls over a growing cache. During a verification each query row is therefore
  attended on its own, through the model's own attention function, over exactly the keys before it
  (:func:`install_attention`). Projections and MLPs stay batched: they are where the weights are read.
- **Linear layers.** On the CPU the project's own kernels (:mod:`.kernels`) run every linear layer, the
  family measured fastest on this machine (:mod:`.cpu_linear`: AMX tiles with packed weights, or vector
  kernels): each output element is one sum in a fixed order, so a row's bits never depend on how many
  rows share the call, and each weight is read once per call (decoding is bound by reading them).
  Where they cannot run (no compiler at first use, fp16 weights, a GPU), torch's kernels do, probed at
  install time: on CPUs a bf16 product with one row takes another kernel than one with two or more, so
  single rows are padded to two there (:func:`install_linear`), and the probe finds up to how many rows
  the property holds (bf16 on AMX CPUs switches kernels past 32 rows); the decoding loop never verifies
  more drafts than that in one call.

Both are installed on the model itself (:func:`install`; :func:`restore` takes them off), so
``transformers``' own ``generate`` on the same model computes with the same numerics and is the exact
reference for plain decoding with them. A model that never had them installed computes with torch's
kernels, which round differently: its greedy text can differ from ours where two tokens are within
rounding of each other (the benchmark measures how often; docs/numerics.md). Calls that do not come from
the runner carry no ``clasp_rows`` argument and reach the model's original attention function unchanged.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from . import cpu_linear, kernels

WRAPPABLE = ("sdpa", "eager")
ROW_LADDER = (2, 3, 4, 5, 8, 9, 12, 16, 17, 24, 31, 32, 33, 40, 48, 56, 63, 64, 65)
"""Row counts the linear probe tries: around the powers of two where kernels change blocking."""


@dataclass(frozen=True)
class RowSpec:
    """How the runner wants a call attended. ``start`` is the first query's slot (= its position).

    ``mode`` is ``"causal"`` (queries at consecutive positions from ``start``, each seeing every slot up
    to its own: one causal call for a prefill from slot 0, row by row otherwise) or ``"masked"`` (the
    given mask as is: the DP's candidates, whose bits need not match anything). ``window`` is the
    sliding window of a sliding-attention layer (``None`` for global attention).
    """

    start: int
    mode: str = "causal"
    window: int | None = None


@dataclass(frozen=True)
class Segment:
    """One generation's rows in a batched pass: ``rows`` query rows at slots ``start ..`` of ``cache``."""

    cache: object
    start: int
    rows: int


@dataclass(frozen=True)
class BatchRows:
    """How the runner wants a batched pass attended: its rows, generation by generation (in order), each
    over its own cache; ``window`` as in :class:`RowSpec`."""

    segments: tuple[Segment, ...]
    window: int | None = None


@dataclass(frozen=True)
class NumericsReport:
    """What :func:`install` could guarantee for a model."""

    attention_rowwise: bool
    linear_mode: str  # "kernel" (the project's), "invariant" (torch's as is), "padded" (single rows padded), "inexact"
    max_rows: int = ROW_LADDER[-1]  # the most rows one call may have and stay row-exact
    prompt_rowwise: bool = False  # prompts too: a prompt's cache is the same however it was cut (prefix reuse)

    @property
    def max_verify_drafts(self) -> int | None:
        """The longest draft one verification may check and stay bit-exact (``None``: no exactness to
        keep, so no limit)."""
        return self.max_rows - 1 if self.exact else None

    @property
    def exact(self) -> bool:
        return self.attention_rowwise and self.linear_mode != "inexact"


# ----------------------------------------------------------------------------- attention


def _inner_function(name: str, module):
    """The attention function ``module`` would call under backend ``name``: for ``eager``, the one its own
    modeling file defines (Gemma's applies a logit soft-cap, for one), else the registered one."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if name == "eager":
        own = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if own is not None:
            return own
        from transformers.models.llama.modeling_llama import eager_attention_forward

        return eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[name]


def _kernel_attends(inner_name: str, query: torch.Tensor, key: torch.Tensor, kwargs: dict) -> bool:
    """Whether the project's attention kernel computes what backend ``inner_name`` would here: sdpa's plain
    scaled softmax attention (no logit soft-capping, no attention sinks, no dropout), bf16 or fp32 on the
    CPU, batch 1."""
    return (
        inner_name == "sdpa"
        and query.device.type == "cpu"
        and query.shape[0] == 1
        and query.dtype in (torch.bfloat16, torch.float32)
        and key.dtype is query.dtype
        and kwargs.get("softcap") is None
        and kwargs.get("s_aux") is None
        and not kwargs.get("dropout")
        and kernels.available()
    )


def _scale(module, query: torch.Tensor, kwargs: dict) -> float:
    scaling = kwargs.get("scaling", getattr(module, "scaling", None))
    return float(scaling) if scaling is not None else query.shape[-1] ** -0.5


def _hf_window(module, query: torch.Tensor, key: torch.Tensor, mask) -> int | None:
    """For ``transformers``' own call (no row spec): the sliding window under which the project's kernel
    attends exactly what ``mask`` allows (0: plainly causal), or ``None`` where it would not (padding, a
    batch, an unusual mask). Queries are the last ``q`` positions of the ``S`` keys given."""
    if query.shape[0] != 1:
        return None
    if mask is None:
        return 0
    q, s = query.shape[2], key.shape[2]
    allowed = mask[0, 0, -q:, :s] if mask.dtype is torch.bool else mask[0, 0, -q:, :s] > -1
    if allowed.shape != (q, s):
        return None
    pos = torch.arange(s - q, s, device=mask.device)[:, None]
    keys = torch.arange(s, device=mask.device)[None, :]
    causal = keys <= pos
    for window in (0, getattr(module, "sliding_window", None) or 0):
        expected = causal & (keys > pos - window) if window else causal
        if torch.equal(allowed, expected):
            return window
    return None


def _make_backend(inner_name: str):
    """The row-exact wrapper of attention backend ``inner_name``.

    Each query row is attended the way one decoding step is: over the keys that its own cache would hold
    (all slots up to the row's position, or for a sliding-window layer the last ``window`` of them). Where
    the project's attention kernel applies (:func:`_kernel_attends`), it attends every row of every call,
    prompts included, each row on its own (:func:`.kernels.attention`): so a row's bits never depend on
    how many rows share the call, and a prompt's cache is the same whether it was prefilled at once, in
    chunks, beside other users or decoded token by token (which prefix reuse relies on). It also attends
    ``transformers``' own calls on this model where their mask is the plain causal (or sliding) one, so
    its ``generate`` computes the same bits. Elsewhere each row is one call of the model's own attention
    function, with no mask while fewer keys than the window are read and, like ``transformers``, an
    all-visible mask once the window is full; and a prefill from slot 0 is one call, as in ``transformers``.
    """

    def clasp_attention(module, query, key, value, attention_mask, *args, clasp_rows: RowSpec | None = None, **kwargs):
        inner = _inner_function(inner_name, module)
        if isinstance(clasp_rows, BatchRows):
            return _batched(clasp_attention, module, query, clasp_rows, args, kwargs)
        if clasp_rows is None:
            if _kernel_attends(inner_name, query, key, kwargs):
                window = _hf_window(module, query, key, attention_mask)
                if window is not None:  # transformers' prefill or decoding step
                    start = key.shape[2] - query.shape[2]
                    return kernels.attention(query, key, value, start, window, _scale(module, query, kwargs)), None
            return inner(module, query, key, value, attention_mask, *args, **kwargs)
        if clasp_rows.mode == "masked":
            return inner(module, query, key, value, attention_mask, *args, **kwargs)
        q = query.shape[2]
        window = clasp_rows.window
        if _kernel_attends(inner_name, query, key, kwargs):
            scale = _scale(module, query, kwargs)
            return kernels.attention(query, key, value, clasp_rows.start, window or 0, scale), None
        if clasp_rows.start == 0 and q > 1:  # a prefill: one call, as transformers makes it
            if inner_name == "eager":  # the additive mask, exactly as transformers' eager mask
                return inner(module, query, key[:, :, :q], value[:, :, :q], attention_mask, *args, **kwargs)
            if window is None or q < window:  # sdpa: transformers drops the mask and attends causally
                return inner(module, query, key[:, :, :q], value[:, :, :q], None, *args, **kwargs)
            mask = attention_mask[:, :, :, :q] > -1 if attention_mask is not None else None
            return inner(module, query, key[:, :, :q], value[:, :, :q], mask, *args, **kwargs)
        return _rows(inner, inner_name, module, query, key, value, attention_mask, clasp_rows, 0, args, kwargs)

    clasp_attention.__name__ = f"clasp_{inner_name}"
    return clasp_attention


def _batched(attend, module, query, batch: BatchRows, args, kwargs):
    """A batched pass: each generation's rows attended over its own cache exactly as they would be alone
    (a prefill from slot 0 as one call, other rows one by one), then side by side again."""
    layer = module.layer_idx
    outs, at = [], 0
    for seg in batch.segments:
        end = seg.start + seg.rows
        keys, values = seg.cache.keys[layer][:, :, :end], seg.cache.values[layer][:, :, :end]
        mask = None
        if seg.start == 0 and seg.rows > 1 and batch.window is not None and seg.rows >= batch.window:
            # a prefill longer than the window: the sliding causal mask a prefill alone is given
            pos = torch.arange(seg.rows, device=query.device)
            allowed = (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - batch.window)
            mask = torch.zeros(allowed.shape, dtype=query.dtype, device=query.device)
            mask = mask.masked_fill_(~allowed, torch.finfo(query.dtype).min)[None, None]
        spec = RowSpec(seg.start, "causal", batch.window)
        out, _ = attend(module, query[:, :, at : at + seg.rows], keys, values, mask, *args, clasp_rows=spec, **kwargs)
        outs.append(out)
        at += seg.rows
    return (outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)), None


def _rows(inner, inner_name, module, query, key, value, attention_mask, rows: RowSpec, first: int, args, kwargs):
    """Rows ``first ..`` of a call, each one call of the backend's own function, with the mask a decoding
    step of ``transformers`` would pass it."""
    window = rows.window
    outs = []
    full_window = None  # the all-visible mask of a full window, made once per call
    for i in range(first, query.shape[2]):
        end = rows.start + i + 1
        lo = max(0, end - window) if window is not None else 0
        row_mask = None
        if inner_name == "eager":
            if attention_mask is not None:
                row_mask = attention_mask[:, :, i : i + 1, lo:end]
        elif window is not None and end - lo >= window:
            if full_window is None:
                full_window = torch.ones(1, 1, 1, window, dtype=torch.bool, device=query.device)
            row_mask = full_window
        out, _ = inner(
            module, query[:, :, i : i + 1], key[:, :, lo:end], value[:, :, lo:end], row_mask, *args, **kwargs
        )
        outs.append(out)
    return (outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)), None


def install_attention(model) -> bool:
    """Switch ``model`` to the row-exact backend that wraps its current one. A backend that reads the
    runner's 4D additive masks as padding masks (flash attention and the like) is first switched to
    ``sdpa``, with a warning; ``False`` if even that is refused."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    current = model.config._attn_implementation or "eager"
    if current.startswith("clasp_"):
        return True
    model._clasp_attention_was = current  # what restore() switches back to
    if current not in WRAPPABLE:
        warnings.warn(
            f"Attention backend {current!r} reads the 4D masks CLaSp builds (verification, layer selection) as "
            "padding masks and would attend the wrong keys; switching this model to 'sdpa'.",
            stacklevel=4,
        )
        try:
            model.set_attn_implementation("sdpa")
        except (ValueError, ImportError):
            return False
        current = model.config._attn_implementation or "eager"
        if current not in WRAPPABLE:
            return False
    name = f"clasp_{current}"
    AttentionInterface.register(name, _make_backend(current))
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[current])
    model.set_attn_implementation(name)
    return model.config._attn_implementation == name


# ----------------------------------------------------------------------------- linear layers

KERNEL_ROWS = 1 << 16
"""Rows one call may have with the project's kernels: any number, since they are row-invariant by
construction (the probe still checks the ladder, in case a build went wrong). Prefills run on them too:
one numerics everywhere is what makes a prompt's cache the same bits whether it was prefilled alone,
beside other users' rows (:mod:`.batching`) or decoded token by token (prefix reuse)."""


def _single_row(x: torch.Tensor) -> bool:
    return x.dim() >= 2 and x.numel() == x.shape[-1]


def _pad_pre_hook(module, args):
    x = args[0]
    if _single_row(x):
        padded = torch.cat([x, x], dim=-2)
        padded._clasp_padded = True  # tells the forward hook to keep the first row
        return (padded, *args[1:])
    return None


def _unpad_hook(module, args, output):
    if getattr(args[0], "_clasp_padded", False):
        return output[..., :1, :]
    return None


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _kernel_forward(self, x: torch.Tensor) -> torch.Tensor:
    """An ``nn.Linear``'s forward through the project's vector kernel (bound to the module by
    :func:`install_linear`); anything the kernel does not take (another dtype or device, autograd of the
    input, the weight or the bias) goes to torch's."""
    w = self.weight
    if x.dtype is w.dtype and x.device.type == "cpu" and not _needs_grad(x, w, self.bias):
        return kernels.linear(x, w, self.bias, cpu_linear.choice(w.dtype).member(x.numel() // max(1, w.shape[1])))
    return torch.nn.functional.linear(x, w, self.bias)


def kernel_suits(module: nn.Module) -> bool:
    """Whether a project kernel can run this linear layer: bf16 or fp32 weights on the CPU, no forward
    already replaced by someone else (a dispatch hook)."""
    w = module.weight
    return (
        w.device.type == "cpu"
        and w.dtype in (torch.bfloat16, torch.float32)
        and w.dim() == 2
        and (w.is_contiguous() or isinstance(w, cpu_linear.PackedWeight))
        and "forward" not in module.__dict__
        and kernels.available()
    )


def probe_linear(weight: torch.Tensor, bias: torch.Tensor | None, seed: int = 0, f=None) -> tuple[str, int]:
    """Whether a linear layer's rows are batch-invariant as is (``"invariant"``), when never run on a
    single row (``"padded"``), or neither (``"inexact"``), on this weight's device and dtype; and up to
    how many rows that holds (a kernel may change its blocking for larger batches: bf16 on AMX CPUs does
    past 32 rows, fp32 MKL on AVX2 past 3). Every row of every batch size in :data:`ROW_LADDER` is
    compared with the same row computed alone (``"invariant"``) or as a duplicated pair (``"padded"``):
    rounding differences are rare per element, so many rows and sizes are needed to see them. ``f`` is
    the product to probe (default: torch's ``linear``)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    rows = ROW_LADDER[-1]
    x = torch.randn(rows, weight.shape[1], generator=g).to(weight.device, weight.dtype)
    f = f or torch.nn.functional.linear
    with torch.inference_mode():
        single = torch.cat([f(x[i : i + 1].clone(), weight, bias) for i in range(rows)])
        pair = torch.cat([f(x[[i, i]], weight, bias)[:1] for i in range(rows)])
        best = None
        for mode, reference in (("invariant", single), ("padded", pair)):
            limit = 1
            for m in ROW_LADDER:
                if not torch.equal(f(x[:m], weight, bias), reference[:m]):
                    break
                limit = m
            if limit == rows:
                return mode, limit
            if best is None or limit > best[1]:
                best = (mode, limit)
    mode, limit = best
    return (mode if limit > 1 else "inexact"), limit


def _key(m: nn.Module) -> tuple:
    return (tuple(m.weight.shape), m.bias is not None, m.weight.dtype, m.weight.device)


def _kernel_product(family: str):
    """The product a family runs, as ``f(x, weight, bias)`` (for the row check)."""
    if family == "tiles":
        return lambda x, w, b: torch.nn.functional.linear(x, cpu_linear.pack(w), b)
    return lambda x, w, b: kernels.linear(x, w, b, cpu_linear.choice(w.dtype).member(x.numel() // w.shape[1]))


def _verdict(m: nn.Module) -> tuple[str, int]:
    """How one linear layer will run: on the project's kernel (``"kernel"``, checked on a slice of its
    weight: the kernel's rows do not depend on the output width), or on torch's, probed."""
    if kernel_suits(m):
        family = cpu_linear.choice(m.weight.dtype).family
        if family != "torch":
            part = m.weight[:64]
            part = part.dense() if isinstance(part, cpu_linear.PackedWeight) else part
            bias = None if m.bias is None else m.bias[:64]
            mode, limit = probe_linear(part, bias, f=_kernel_product(family))
            if mode == "invariant" and limit == ROW_LADDER[-1]:
                return "kernel", KERNEL_ROWS
            warnings.warn(
                f"clasp-decoding's {family} kernel failed its row check on {tuple(m.weight.shape)}; using torch's.",
                stacklevel=3,
            )
    return probe_linear(m.weight, m.bias)


def _holders(model) -> dict[int, list[tuple[nn.Module, str]]]:
    """Every (module, name) holding each parameter, by the parameter's id (a tied head and embedding share
    one)."""
    out: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None:
                out.setdefault(id(p), []).append((module, name))
    return out


def _replace(holders: list[tuple[nn.Module, str]], new: nn.Parameter) -> None:
    for module, name in holders:
        module._parameters[name] = new


def _pack_in_place(m: nn.Module, holders: dict, mappings: list) -> None:
    """Swap ``m``'s weight (and every other holder of it) for its packed tiles; the dense one is freed
    (or, where it is a read-only view of the model's file, its pages are released)."""
    old = m.weight
    if isinstance(old, cpu_linear.PackedWeight):
        return
    with torch.inference_mode(False), torch.no_grad():
        param = nn.Parameter(cpu_linear.pack(old.detach()), requires_grad=False)
    param.was_requires_grad = old.requires_grad  # what restore() gives back
    _replace(holders.get(id(old), [(m, "weight")]), param)
    kernels.release_file_pages(old, mappings)


def install_linear(model) -> tuple[str, int]:
    """Run every linear layer a project kernel suits on the kernel chosen for this machine (packing bf16
    weights in place for the tile kernels, :mod:`.cpu_linear`); probe the others (torch's kernels) and
    pad single rows where that makes rows invariant. Returns the model's overall mode (``"kernel"``,
    ``"invariant"``, ``"padded"`` or ``"inexact"``: the weakest of its layers) and the most rows one call
    may have for that to hold."""
    if getattr(model, "_clasp_linear_mode", None):
        return model._clasp_linear_mode
    # Offloaded layers (weights on "meta", brought in by accelerate's hooks per call) cannot be probed:
    # they run as they are, and their device's kernels are not checked.
    linears = [m for m in model.modules() if isinstance(m, nn.Linear) and m.weight.device.type != "meta"]
    verdicts: dict[tuple, tuple[str, int]] = {}
    for m in linears:
        if _key(m) not in verdicts:
            verdicts[_key(m)] = _verdict(m)
    holders = _holders(model)
    mappings = kernels.file_mappings()
    moved: set[int] = set()
    for m in linears:
        mode = verdicts[_key(m)][0]
        if mode == "kernel" and cpu_linear.choice(m.weight.dtype).family == "tiles":
            _pack_in_place(m, holders, mappings)
        elif mode == "kernel":
            m.forward = types.MethodType(_kernel_forward, m)
            if id(m.weight) not in moved:  # a tied head shares its weight with the embedding: once
                moved.add(id(m.weight))
                old = m.weight.data
                with torch.no_grad():
                    m.weight.data = kernels.in_huge_pages(old)
                if m.weight.data.data_ptr() != old.data_ptr():
                    kernels.release_file_pages(old, mappings)
        elif mode == "padded":
            m.register_forward_pre_hook(_pad_pre_hook)
            m.register_forward_hook(_unpad_hook)
    kernels.trim_memory()
    order = ("inexact", "padded", "invariant", "kernel")
    mode = min((v[0] for v in verdicts.values()), key=order.index, default="kernel")
    limit = min((v[1] for v in verdicts.values()), default=KERNEL_ROWS)
    model._clasp_linear_mode = (mode, limit)
    return mode, limit


def linear_kernels(model) -> str:
    """In words, which kernels run ``model``'s linear layers (for notices and reports)."""
    dtypes = {m.weight.dtype for m in model.modules() if isinstance(m, nn.Linear) and m.weight.device.type == "cpu"}
    described = [
        f"{cpu_linear._dtype_name(d)}: {cpu_linear.choice(d).describe()}"
        for d in dtypes
        if d in (torch.bfloat16, torch.float32)
    ]
    return "; ".join(described) if described and kernels.available() else "torch's"


def _kernel_attends_everything(model) -> bool:
    """Whether every row of every call, prompts included, goes through the project's attention kernel
    (and every linear layer through its row-invariant kernels): sdpa's plain attention on the CPU in bf16
    or fp32, no logit soft-capping or attention sinks."""
    cfg = model.config
    p = next(model.parameters(), None)
    return (
        (cfg._attn_implementation or "") == "clasp_sdpa"
        and p is not None
        and p.device.type == "cpu"
        and p.dtype in (torch.bfloat16, torch.float32)
        and not getattr(cfg, "attn_logit_softcapping", None)
        and getattr(model, "_clasp_linear_mode", ("",))[0] == "kernel"
        and kernels.available()
    )


def install(model) -> NumericsReport:
    """Install both; warn once if greedy exactness cannot be guaranteed on this hardware."""
    report = NumericsReport(install_attention(model), *install_linear(model))
    if _kernel_attends_everything(model):
        report = dataclasses.replace(report, prompt_rowwise=True)
    if not report.exact and not getattr(model, "_clasp_warned", False):
        model._clasp_warned = True
        warnings.warn(
            "On this device/dtype, batched verification cannot be made bit-identical to one-token decoding "
            f"(attention row-exact: {report.attention_rowwise}, linear layers: {report.linear_mode}); greedy "
            "output equals plain decoding's except where two tokens tie to within rounding.",
            stacklevel=3,
        )
    return report


def restore(model) -> bool:
    """Undo :func:`install`: the model's own attention backend and torch's linear layers again, as loaded
    (it works on a deep copy of an installed model too). Returns whether anything was installed."""
    if not hasattr(model, "_clasp_linear_mode") and not hasattr(model, "_clasp_attention_was"):
        return False
    holders = _holders(model)
    for m in model.modules():
        for p in list(m._parameters.values()):
            if isinstance(p, cpu_linear.PackedWeight):
                with torch.inference_mode(False), torch.no_grad():
                    dense = nn.Parameter(p.dense(), requires_grad=getattr(p, "was_requires_grad", False))
                _replace(holders[id(p)], dense)
        if isinstance(m, nn.Linear) and getattr(m.__dict__.get("forward"), "__func__", None) is _kernel_forward:
            del m.forward
        for hooks, ours in ((m._forward_pre_hooks, _pad_pre_hook), (m._forward_hooks, _unpad_hook)):
            for key in [k for k, fn in hooks.items() if fn is ours]:
                del hooks[key]
    was = getattr(model, "_clasp_attention_was", None)
    if was is not None:
        model.set_attn_implementation(was)
    for name in ("_clasp_linear_mode", "_clasp_attention_was", "_clasp_warned"):
        model.__dict__.pop(name, None)
    return True
