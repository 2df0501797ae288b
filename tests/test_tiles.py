"""The tile kernels (AMX tiles, their AVX-512 twin, the exact emulation), the packed weights they read,
and the measured choice of kernel.

The emulation is checked against an independent reference written here from the documented semantics
of TDPBF16PS; every other tile kernel is checked bit for bit against the emulation. On a CPU without AMX
the real tiles are not run (the test says it skipped): the emulation's blocking and packing still are."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch

from clasp_decoding import cpu_linear, kernels

pytestmark = pytest.mark.skipif(not kernels.available(), reason="the kernels could not be built here")

FLT_MIN = 2.0**-126


def wide_bf16(shape, g, lo=-40, hi=40, specials=True) -> torch.Tensor:
    """bf16 values over a wide range of exponents, with zeros, negative zeros and denormals sprinkled in."""
    mant = torch.rand(shape, generator=g) + 1.0
    exp = torch.randint(lo, hi, shape, generator=g).float()
    sign = torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0)
    t = (sign * mant * torch.pow(2.0, exp)).bfloat16()
    if specials:
        flat = t.view(-1)
        n = flat.numel()
        idx = torch.randint(0, n, (max(1, n // 50),), generator=g)
        flat[idx[0::3]] = 0.0
        flat[idx[1::3]] = -0.0
        den = torch.tensor([2.0**-130, -(2.0**-128), 2.0**-133]).bfloat16()
        flat[idx[2::3]] = den[torch.arange(idx[2::3].numel()) % 3]
    return t


def flush(t: torch.Tensor) -> torch.Tensor:
    return torch.where(t.abs() < FLT_MIN, torch.copysign(torch.zeros_like(t), t), t)


def tile_reference(
    x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, fp32: bool = False
) -> torch.Tensor:
    """TDPBF16PS as documented (measured on a Xeon with AMX: docs/numerics.md): per output and per 32
    inputs, an even and an odd fp32 sum over the 16 pairs, each in order, rounded after every addition,
    then C + (even + odd); denormal inputs and results are zero. Then bias, one rounding to bf16. Written
    with torch's fp32 arithmetic, independently of the C++ emulation."""
    m, k = x.shape
    n = w.shape[0]
    kp = -(-k // 32) * 32
    xf = torch.nn.functional.pad(flush(x.float()), (0, kp - k))
    wf = torch.nn.functional.pad(flush(w.float()), (0, kp - k))
    acc = torch.zeros(m, n)
    for kb in range(kp // 32):
        even = torch.zeros(m, n)
        odd = torch.zeros(m, n)
        for p in range(16):
            i = kb * 32 + 2 * p
            even = flush(even + xf[:, i, None] * wf[None, :, i])  # a bf16 product is exact in fp32
            odd = flush(odd + xf[:, i + 1, None] * wf[None, :, i + 1])
        acc = flush(acc + flush(even + odd))
    if bias is not None:
        acc = acc + bias.float()
    return acc if fp32 else acc.bfloat16()


def tile(x, w, bias=None, isa="tile_emulated"):
    return kernels.tile_linear(x, kernels.pack_tiles(w), w.shape[0], w.shape[1], bias, isa)


SHAPES = [(1, 1, 1), (3, 5, 31), (16, 16, 32), (17, 17, 33), (33, 40, 100), (2, 3, 64), (5, 70, 96)]


def test_the_emulation_follows_the_documented_semantics():
    """Odd sizes (tails in rows, features and inputs), wide exponents, signed zeros, denormals, bias."""
    g = torch.Generator().manual_seed(0)
    for m, n, k in SHAPES:
        x, w = wide_bf16((m, k), g), wide_bf16((n, k), g)
        bias = torch.randn(n, generator=g).bfloat16()
        for b in (None, bias):
            got, want = tile(x, w, b), tile_reference(x, w, b)
            assert torch.equal(got.view(torch.int16), want.view(torch.int16)), (m, n, k, b is not None)


def test_a_sum_in_another_order_would_be_caught():
    """The reference's order matters: the manual's per-element order (C += a0 b0, then C += a1 b1) gives
    other bits on these inputs, so a kernel that summed that way could not pass the tests above."""
    g = torch.Generator().manual_seed(1)
    flipped = 0
    for lo, hi, share in ((-8, 8, 0.5), (-40, 40, 0.01)):
        x, w = wide_bf16((64, 256), g, lo, hi, False), wide_bf16((64, 256), g, lo, hi, False)
        naive = torch.zeros(64, 64)
        for i in range(256):
            naive = naive + x[:, i, None].float() * w[None, :, i].float()
        ordered = tile_reference(x, w, fp32=True)
        assert (naive != ordered).float().mean() > share  # the sums differ before rounding to bf16 ...
        assert torch.equal(tile(x, w), ordered.bfloat16())
        flipped += int((naive.bfloat16() != ordered.bfloat16()).sum())
    assert flipped >= 1  # ... and some outputs after it


def other_tile_isas() -> list[str]:
    return [i for i in kernels.tile_isas() if i != "tile_emulated"]


@pytest.mark.parametrize("isa", ["amx", "tile_avx512"])
def test_each_tile_kernel_gives_the_emulations_bits(isa):
    """The real tiles (where this CPU has AMX and Linux grants it) and the AVX-512 twin, against the
    emulation, bit for bit: odd shapes with wide exponents, and real layer shapes at decoding, verification
    and prefill row counts (the many-row blocking keeps partial sums between chunks of the inputs)."""
    if isa not in kernels.tile_isas():
        pytest.skip(f"{isa} does not run on this CPU (tile kernels here: {kernels.tile_isas()})")
    g = torch.Generator().manual_seed(2)
    for m, n, k in SHAPES:
        x, w = wide_bf16((m, k), g), wide_bf16((n, k), g)
        b = torch.randn(n, generator=g).bfloat16()
        assert torch.equal(tile(x, w, b, isa).view(torch.int16), tile(x, w, b).view(torch.int16)), (m, n, k)
    for m, n, k in [(1, 128, 896), (8, 96, 4864), (64, 64, 1536), (300, 40, 1000), (70, 33, 2100)]:
        x, w = torch.randn(m, k, generator=g).bfloat16(), torch.randn(n, k, generator=g).bfloat16()
        assert torch.equal(tile(x, w, None, isa), tile(x, w)), (m, n, k)


@pytest.mark.parametrize("isa", ["tile_emulated", *other_tile_isas()] if kernels.available() else [])
def test_tile_rows_do_not_depend_on_the_row_count(isa):
    """Every row of every call, 1 to 70 rows and 300 (the chunked blocking), equals that row alone; with an
    input width that is not a multiple of the tiles' (1000: the K tail), and output tails."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(37, 1000, generator=g).bfloat16()
    b = torch.randn(37, generator=g).bfloat16()
    packed = kernels.pack_tiles(w)
    x = torch.randn(300, 1000, generator=g).bfloat16()

    def f(t):
        return kernels.tile_linear(t, packed, 37, 1000, b, isa)

    alone = torch.cat([f(x[i : i + 1]) for i in range(300)])
    for m in (*range(1, 71), 300):
        assert torch.equal(f(x[:m]), alone[:m]), m


def test_threads_split_features_never_sums():
    g = torch.Generator().manual_seed(4)
    w = torch.randn(4096, 896, generator=g).bfloat16()
    packed = kernels.pack_tiles(w)
    x = torch.randn(100, 896, generator=g).bfloat16()
    isas = other_tile_isas() or ["tile_emulated"]
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outs.append([kernels.tile_linear(x[:m], packed, 4096, 896, None, i) for m in (1, 9, 100) for i in isas])
    finally:
        torch.set_num_threads(before)
    for other in outs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(outs[0], other, strict=True))


def test_a_thread_in_another_floating_point_mode_gets_the_same_bits():
    """A caller that turned flush-to-zero on (or off) changes nothing: each kernel sets its own mode. The
    fp32 vector kernel sees denormal products here, so a kernel that inherited the mode would differ."""
    g = torch.Generator().manual_seed(5)
    x32 = torch.randn(4, 64, generator=g) * 1e-20
    w32 = torch.randn(16, 64, generator=g) * 1e-20
    xb, wb = wide_bf16((4, 64), g), wide_bf16((16, 64), g)
    calls = [lambda i=i: kernels.linear(x32, w32, None, i) for i in kernels.isas()]
    calls += [lambda i=i: tile(xb, wb, None, i) for i in kernels.tile_isas()]
    before = [c() for c in calls]
    assert (before[0] != 0).any() and (before[0].abs() < FLT_MIN).any()  # denormal results exist
    torch.set_flush_denormal(True)
    try:
        after = [c() for c in calls]
    finally:
        torch.set_flush_denormal(False)
    for a, b in zip(before, after, strict=True):
        bits = torch.int32 if a.dtype == torch.float32 else torch.int16
        assert torch.equal(a.view(bits), b.view(bits))


def test_nothing_to_sum_gives_the_bias():
    """K = 0: zeros plus the bias, not a crash (it was a division by zero)."""
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(3, 0).to(dtype)
        w = torch.randn(5, 0).to(dtype)
        b = torch.randn(5).to(dtype)
        assert torch.equal(kernels.linear(x, w, b), b.expand(3, 5))
        assert torch.equal(kernels.linear(x, w), torch.zeros(3, 5, dtype=dtype))
    xb, wb, bb = torch.randn(3, 0).bfloat16(), torch.randn(5, 0).bfloat16(), torch.randn(5).bfloat16()
    assert torch.equal(tile(xb, wb, bb), bb.expand(3, 5))


def test_packing_round_trips_and_refuses_bad_shapes():
    g = torch.Generator().manual_seed(6)
    for n, k in [(1, 1), (17, 33), (48, 64), (100, 7)]:
        w = torch.randn(n, k, generator=g).bfloat16()
        packed = kernels.pack_tiles(w)
        assert packed.numel() == kernels.tile_elements(n, k)
        assert torch.equal(kernels.unpack_tile_rows(packed, n, k, torch.arange(n)), w)
        assert torch.equal(kernels.unpack_tile_rows(packed, n, k, torch.tensor([n - 1, 0])), w[[n - 1, 0]])
    with pytest.raises(RuntimeError, match="do not hold"):
        kernels.tile_linear(torch.randn(1, 64).bfloat16(), kernels.pack_tiles(w), 100, 64)
    with pytest.raises(RuntimeError, match=r"row ids must lie in \[0, 100\)"):
        kernels.unpack_tile_rows(kernels.pack_tiles(w), 100, 7, torch.tensor([100]))
    with pytest.raises(RuntimeError, match="x has 6 features, the weight 7"):
        kernels.tile_linear(torch.randn(1, 6).bfloat16(), kernels.pack_tiles(w), 100, 7)


def test_a_packed_weight_behaves_as_the_dense_one():
    """Linear and embedding lookups on the tiles, prefix slices as views, any other use unpacked, deep
    copies, parameters; gradients still reach an input that asks for them."""
    g = torch.Generator().manual_seed(7)
    w = torch.randn(50, 96, generator=g).bfloat16()
    p = cpu_linear.pack(w)
    param = torch.nn.Parameter(p, requires_grad=False)
    assert isinstance(param, torch.nn.Parameter) and isinstance(param, cpu_linear.PackedWeight)
    assert param.shape == (50, 96) and param.dtype == torch.bfloat16 and not param.requires_grad
    x = torch.randn(4, 96, generator=g).bfloat16()
    b = torch.randn(50, generator=g).bfloat16()
    with torch.inference_mode():
        assert torch.equal(
            torch.nn.functional.linear(x, param, b), tile(x, w, b, cpu_linear.choice(torch.bfloat16).member(4))
        )
        ids = torch.tensor([[3, 49], [0, 7]])
        assert torch.equal(torch.nn.functional.embedding(ids, param), w[ids])
        head = param[:20]
        assert isinstance(head, cpu_linear.PackedWeight) and head.shape == (20, 96)
        assert head.packed.data_ptr() == p.packed.data_ptr()  # a view, no copy
        assert torch.equal(head.dense(), w[:20])
        assert torch.equal(param[[4, 9]], w[[4, 9]]) and torch.equal(param[5:9], w[5:9])
        assert torch.equal(param.float(), w.float()) and torch.equal(param.t(), w.t())
    clone = copy.deepcopy(param)
    assert isinstance(clone, cpu_linear.PackedWeight) and clone.packed.data_ptr() != p.packed.data_ptr()
    assert torch.equal(clone.dense(), w)
    xg = x.float().bfloat16().requires_grad_(True)
    torch.nn.functional.linear(xg, param).sum().backward()
    ref = xg.detach().clone().requires_grad_(True)
    torch.nn.functional.linear(ref, w).sum().backward()
    assert xg.grad is not None and torch.equal(xg.grad, ref.grad)


def test_the_choice_is_measured_kept_and_forced(monkeypatch, tmp_path):
    """The verdict comes from timings (the family with the lowest relative time wins, each row bucket its
    fastest member), is kept per machine in the cache, and CLASP_LINEAR overrides it."""
    ms = {
        "amx": [1.0, 1.0, 2.0],
        "tile_avx512": [0.9, 2.0, 9.0],
        "avx512bf16": [0.8, 2.5, 12.0],
        "torch": [1.5, 1.2, 2.1],
    }
    fam = {"amx": "tiles", "tile_avx512": "tiles", "avx512bf16": "vector", "torch": "torch"}
    c = cpu_linear.decide("bf16", ms, fam)
    assert c.family == "tiles" and c.members == ("tile_avx512", "amx", "amx")
    assert c.member(1) == "tile_avx512" and c.member(8) == "amx" and c.member(9) == "amx"
    slow_tiles = {"amx": [3.0, 3.0, 3.0], "avx512bf16": [1.0, 1.1, 4.0], "torch": [1.2, 1.0, 1.0]}
    assert cpu_linear.decide("bf16", slow_tiles, fam).family in ("vector", "torch")
    portable = {"scalar": [10.0, 30.0, 200.0], "torch": [1.0, 1.2, 2.0]}  # never install a kernel slower than torch
    assert cpu_linear.decide("bf16", portable, {"scalar": "vector", "torch": "torch"}).family == "torch"

    monkeypatch.setenv("CLASP_CACHE_DIR", str(tmp_path))
    cpu_linear._verdict.cache_clear()
    calls = []
    real = cpu_linear.measure
    monkeypatch.setattr(cpu_linear, "measure", lambda dtype: calls.append(dtype) or real(dtype, rounds=1))
    first = cpu_linear.choice(torch.bfloat16)
    cpu_linear._verdict.cache_clear()
    again = cpu_linear.choice(torch.bfloat16)
    assert calls == [torch.bfloat16] and again == first  # measured once, then read back
    assert (tmp_path / "kernels" / "linear-choice.json").is_file()
    cpu_linear._verdict.cache_clear()
    monkeypatch.setenv("CLASP_LINEAR", "tile_emulated")
    forced = cpu_linear.choice(torch.bfloat16)
    assert forced.family == "tiles" and forced.members == ("tile_emulated",) * 3 and forced.forced
    # a tile kernel named for bf16 leaves other dtypes on the vector kernels (no error for fp32 layers)
    assert cpu_linear.choice(torch.float32).family == "vector" or kernels.isa() is None
    monkeypatch.setenv("CLASP_LINEAR", "bogus")
    with pytest.raises(ValueError, match="CLASP_LINEAR='bogus'"):
        cpu_linear.choice(torch.bfloat16)
    cpu_linear._verdict.cache_clear()  # the next test reads this machine's kept verdict, not this one's


def test_a_model_on_the_emulated_tiles_generates_what_the_fastest_kernel_does():
    """The whole model through the emulation (any CPU) and through this machine's fastest tile kernel: the
    same greedy tokens and the same logits, bit for bit; and restore gives the original weights back."""
    from clasp_decoding import numerics
    from conftest import tiny_model

    model = tiny_model("qwen2", seed=3, dtype=torch.bfloat16, tie_word_embeddings=True)
    dense = {n: p.detach().clone() for n, p in model.named_parameters()}
    env = os.environ.get("CLASP_LINEAR")
    try:
        os.environ["CLASP_LINEAR"] = "tiles"
        numerics.install(model)
        assert isinstance(model.lm_head.weight, cpu_linear.PackedWeight)
        assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
        ids = torch.tensor([[5, 9, 13, 2, 40, 41]])
        with torch.inference_mode():
            fast = model(ids).logits
            os.environ["CLASP_LINEAR"] = "tile_emulated"
            emulated = model(ids).logits
        assert torch.equal(fast, emulated)
    finally:
        if env is None:
            os.environ.pop("CLASP_LINEAR", None)
        else:
            os.environ["CLASP_LINEAR"] = env
    numerics.restore(model)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    for n, p in model.named_parameters():
        assert type(p) is torch.nn.Parameter and torch.equal(p, dense[n]), n


GUARD_SWEEP = r"""
import ctypes, mmap, torch
from clasp_decoding import kernels
libc = ctypes.CDLL(None)
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
keep = []
def guarded(t):
    # a copy of t whose last byte is the last byte before an unreadable page
    nbytes = t.numel() * t.element_size()
    pages = -(-nbytes // mmap.PAGESIZE) + 1
    area = mmap.mmap(-1, pages * mmap.PAGESIZE)
    base = ctypes.addressof(ctypes.c_char.from_buffer(area))
    assert libc.mprotect(base + (pages - 1) * mmap.PAGESIZE, mmap.PAGESIZE, 0) == 0
    start = (pages - 1) * mmap.PAGESIZE - nbytes
    out = torch.frombuffer(area, dtype=t.dtype, count=t.numel(), offset=start).view(t.shape)
    out.copy_(t)
    keep.append(area)
    return out
g = torch.Generator().manual_seed(0)
n = 0
for k in (64, 96, 128, 200):
    for m in (1, 2, 3, 5, 7, 9, 17, 33, 65):
        xb = guarded(torch.randn(m, k, generator=g).bfloat16())
        xf = guarded(torch.randn(m, k, generator=g))
        w = torch.randn(19, k, generator=g)
        for isa in kernels.isas():
            kernels.linear(xb, guarded(w.bfloat16()), None, isa)
            kernels.linear(xf, guarded(w), None, isa)
            q = guarded(torch.randint(-128, 127, (19, k), dtype=torch.int8))
            kernels.linear_int8(xb, q, torch.rand(19), None, isa)
            if k % 64 == 0:
                packed, s, z = kernels.pack_int4(w, 64)
                kernels.linear_int4(xb, guarded(packed), s, z, 64, None, isa)
            n += 1
        for isa in kernels.tile_isas():
            kernels.tile_linear(xb, guarded(kernels.pack_tiles(w.bfloat16())), 19, k, None, isa)
            n += 1
print("ok", n)
"""


def test_no_kernel_reads_past_its_inputs():
    """Every kernel, every instruction set, odd row counts and widths, with inputs and weights that end
    right before an unreadable page: a read past the end is a crash (run apart, so that it fails the test
    instead of the run)."""
    done = subprocess.run([sys.executable, "-c", GUARD_SWEEP], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.startswith("ok"), (done.returncode, done.stderr[-2000:])


def test_no_generation_unpacks_a_packed_weight(monkeypatch):
    """Once a model's drafts are made, generating with any method never unpacks a packed weight (asking a
    layer's size included): an unpack costs milliseconds per layer, per generation."""
    from clasp_decoding import generate, numerics
    from clasp_decoding.config import GenerationConfig
    from conftest import random_prompt, tiny_model

    model = tiny_model("qwen2", seed=4, dtype=torch.bfloat16)
    monkeypatch.setenv("CLASP_LINEAR", "tiles")
    numerics.install(model)
    try:
        assert isinstance(model.model.layers[0].mlp.down_proj.weight, cpu_linear.PackedWeight)
        prompt = random_prompt(8, 20) * 2
        unpacked = []
        real_dense = cpu_linear.PackedWeight.dense
        monkeypatch.setattr(
            cpu_linear.PackedWeight, "dense", lambda self: unpacked.append(self.shape) or real_dense(self)
        )
        for method in ("ar", "clasp", "pld", "suffix", "hybrid"):
            cfg = GenerationConfig(max_new_tokens=12, method=method)
            generate(model, None, prompt, cfg)  # the first makes the draft's copies (once per model)
            unpacked.clear()
            generate(model, None, prompt, cfg)
            assert not unpacked, (method, unpacked)
    finally:
        numerics.restore(model)
