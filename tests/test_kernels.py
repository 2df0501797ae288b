"""The compiled CPU kernels: row invariance (bit for bit, every row count, every instruction set this CPU
runs), agreement with torch within bf16 rounding, the quantized variants, and the fallback without them."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from clasp_decoding import cpu_linear, kernels

pytestmark = pytest.mark.skipif(not kernels.available(), reason="the kernels could not be built here")

SHAPES = {  # (out, in) of every distinct linear layer of the built-in models (the heads checked apart)
    "qwen2.5-0.5b": [(896, 896), (128, 896), (4864, 896), (896, 4864)],
    "qwen2.5-1.5b": [(1536, 1536), (256, 1536), (8960, 1536), (1536, 8960)],
    "smollm2-135m": [(576, 576), (192, 576), (1536, 576), (576, 1536)],
    "gemma3-270m": [(1024, 640), (256, 640), (640, 1024), (2048, 640), (640, 2048)],
}
HEADS = [(151936, 896), (49152, 576)]
ROWS = range(1, 65)


def vector_isas() -> list[str]:
    return [i for i in kernels.isas() if i != "scalar"]


def assert_rows_invariant(f, x: torch.Tensor, rows=ROWS) -> torch.Tensor:
    """Every row of every batch equals that row computed alone."""
    alone = torch.cat([f(x[i : i + 1]) for i in range(x.shape[0])])
    for m in rows:
        got = f(x[:m])
        assert torch.equal(got, alone[:m]), f"{m} rows differ from single rows"
    return alone


@pytest.mark.parametrize("model", list(SHAPES))
def test_bf16_rows_are_bit_identical_for_every_row_count(model):
    g = torch.Generator().manual_seed(1)
    for isa in vector_isas():
        for n, k in SHAPES[model]:
            w = torch.randn(n, k, generator=g).bfloat16()
            bias = torch.randn(n, generator=g).bfloat16() if n in (128, 256, 896, 1536) else None
            x = torch.randn(64, k, generator=g).bfloat16()
            out = assert_rows_invariant(lambda t, w=w, b=bias, isa=isa: kernels.linear(t, w, b, isa), x)
            ref = torch.nn.functional.linear(x.float(), w.float(), None if bias is None else bias.float())
            # fp32 sums in another order, then one bf16 rounding: within a bf16 ulp of the exact value
            torch.testing.assert_close(out.float(), ref, rtol=2**-7, atol=1e-2)


def test_the_thread_count_never_changes_a_bit():
    """Threads split output features (and attention rows), never a sum: 1, 2 and 3 threads give the same
    bits, for few rows and for many (K-chunked) rows, and for the attention kernel."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(8960, 1536, generator=g).bfloat16()
    x = torch.randn(200, 1536, generator=g).bfloat16()
    q = torch.randn(1, 4, 6, 64, generator=g).bfloat16()
    k, v = (torch.randn(1, 4, 40, 64, generator=g).bfloat16() for _ in range(2))
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outs.append(
                (
                    kernels.linear(x[:1], w),
                    kernels.linear(x[:7], w),
                    kernels.linear(x, w),
                    kernels.attention(q, k, v, 30),
                )
            )
    finally:
        torch.set_num_threads(before)
    for other in outs[1:]:
        for a, b in zip(outs[0], other, strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("isa", kernels.isas() if kernels.available() else [])
def test_a_row_alone_equals_the_same_row_in_a_call_whose_sums_are_chunked(isa):
    """Many rows make the vector kernels sum K in chunks (partial sums kept between them): the chunk that
    ends in the K tail must count it. 300 rows of K = 1000 (not a multiple of any chunk or vector)."""
    g = torch.Generator().manual_seed(9)
    for dtype in (torch.bfloat16, torch.float32):
        w = torch.randn(24, 1000, generator=g).to(dtype)
        x = torch.randn(300, 1000, generator=g).to(dtype)
        rows = (1, 2, 299, 300) if isa != "scalar" else (1, 300)
        assert_rows_invariant(lambda t, w=w: kernels.linear(t, w, None, isa), x, rows=rows)


def test_heads_and_the_slow_paths():
    """The vocabulary heads on the best instruction set (a few row counts: they are big), and the portable
    kernel on small shapes (it is slow)."""
    g = torch.Generator().manual_seed(2)
    for n, k in HEADS:
        w = torch.randn(n, k, generator=g).bfloat16()
        x = torch.randn(9, k, generator=g).bfloat16()
        assert_rows_invariant(lambda t, w=w: kernels.linear(t, w), x, rows=(1, 2, 5, 8, 9))
    w = torch.randn(100, 200, generator=g).bfloat16()
    x = torch.randn(33, 200, generator=g).bfloat16()
    assert_rows_invariant(lambda t: kernels.linear(t, w, None, "scalar"), x, rows=(1, 2, 3, 17, 33))


@pytest.mark.parametrize("isa", kernels.isas() if kernels.available() else [])
def test_every_instruction_set_handles_odd_shapes_and_fp32(isa):
    """Widths that are not multiples of any vector or block (tails), 3D inputs, bias, and fp32 weights."""
    g = torch.Generator().manual_seed(3)
    for n, k in [(1, 1), (5, 7), (17, 33), (37, 100), (130, 257)]:
        for dtype in (torch.bfloat16, torch.float32):
            w = torch.randn(n, k, generator=g).to(dtype)
            b = torch.randn(n, generator=g).to(dtype)
            x = torch.randn(2, 35, k, generator=g).to(dtype)
            out = kernels.linear(x, w, b, isa)
            assert out.shape == (2, 35, n) and out.dtype == dtype
            flat = x.reshape(70, k)
            assert_rows_invariant(lambda t, w=w, b=b: kernels.linear(t, w, b, isa), flat, rows=(1, 2, 3, 5, 8, 70))
            ref = torch.nn.functional.linear(x.double(), w.double(), b.double())
            tol = dict(rtol=2**-7, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-4)
            torch.testing.assert_close(out.double(), ref, **tol)


@pytest.mark.parametrize("isa", kernels.isas() if kernels.available() else [])
def test_quantized_kernels_match_their_dequantized_weights(isa):
    g = torch.Generator().manual_seed(4)
    for n, k in [(96, 128), (33, 256), (64, 896)]:
        w = torch.randn(n, k, generator=g)
        x = torch.randn(40, k, generator=g).bfloat16()
        b = torch.randn(n, generator=g).bfloat16()
        scale = w.abs().amax(1) / 127
        q = (w / scale[:, None]).round().clamp(-128, 127).to(torch.int8)
        out = assert_rows_invariant(
            lambda t, q=q, scale=scale, b=b: kernels.linear_int8(t, q, scale, b, isa), x, rows=(1, 2, 5, 40)
        )
        ref = torch.nn.functional.linear(x.double(), (q.double() * scale.double()[:, None]), b.double())
        torch.testing.assert_close(out.double(), ref, rtol=2**-7, atol=2e-2)
        for group in (64, 128):
            if k % group:
                continue
            packed, s, z = kernels.pack_int4(w, group)
            out = assert_rows_invariant(
                lambda t, p=packed, s=s, z=z, gr=group, b=b: kernels.linear_int4(t, p, s, z, gr, b, isa),
                x,
                rows=(1, 3, 40),
            )
            ref = torch.nn.functional.linear(x.double(), kernels.unpack_int4(packed, s, z, group).double(), b.double())
            torch.testing.assert_close(out.double(), ref, rtol=2**-7, atol=2e-2)
            assert (kernels.unpack_int4(packed, s, z, group) - w).abs().max() <= s.max() / 2 + 1e-6


def test_bad_inputs_are_refused_with_a_message():
    w = torch.randn(8, 16).bfloat16()
    with pytest.raises(RuntimeError, match="x has 15 features, the weight 16"):
        kernels.linear(torch.randn(2, 15).bfloat16(), w)
    with pytest.raises(RuntimeError, match="x must be bfloat16"):
        kernels.linear(torch.randn(2, 16), w)
    with pytest.raises(RuntimeError, match="not supported by this CPU|instruction set 'neon'"):
        kernels.linear(torch.randn(2, 16).bfloat16(), w, None, "neon")
    with pytest.raises(ValueError, match="multiple of 64"):
        kernels.pack_int4(torch.randn(8, 96), 32)


def test_without_kernels_torch_runs_and_output_stays_exact(tmp_path):
    """CLASP_KERNELS=0 (as where no compiler exists): said once, torch's kernels with padding run, and
    greedy output still equals transformers' generate on the same model."""
    code = """
import warnings
from clasp_decoding import cpu_linear, kernels
from conftest import tiny_model, hf_greedy, random_prompt, run_tokens
from clasp_decoding.config import GenerationConfig
from clasp_decoding.context import runner_for
import torch
with warnings.catch_warnings(record=True) as seen:
    warnings.simplefilter("always")
    assert not kernels.available() and not kernels.available()
assert sum("CPU kernels are unavailable" in str(w.message) for w in seen) == 1, [str(w.message) for w in seen]
model = tiny_model("qwen2", seed=2, dtype=torch.bfloat16)
prompt = random_prompt(3, 9)
ref = hf_greedy(model, prompt, 24)
out, _ = run_tokens(model, prompt, GenerationConfig(max_new_tokens=24, method="clasp", num_skip=2))
assert out == ref
assert runner_for(model).numerics.linear_mode in ("padded", "invariant"), runner_for(model).numerics
print("ok")
"""
    env = dict(os.environ, CLASP_KERNELS="0", PYTHONPATH=os.path.dirname(__file__))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


def test_the_model_runs_on_the_kernels():
    """After installation every bf16/fp32 linear layer of a CPU model is the kernel's, and the numerics
    report says so: verification has no row cap."""
    from clasp_decoding.context import runner_for
    from conftest import tiny_model

    if cpu_linear.choice(torch.bfloat16).family == "torch":
        pytest.skip("torch's bf16 kernels measured fastest on this machine: the project's are not installed")
    model = tiny_model("llama", dtype=torch.bfloat16)
    runner = runner_for(model)
    assert runner.numerics.linear_mode == "kernel" and runner.numerics.max_verify_drafts >= 1000
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    if cpu_linear.choice(torch.bfloat16).family == "tiles":
        assert linears and all(isinstance(m.weight, cpu_linear.PackedWeight) for m in linears)
    else:
        assert linears and all("forward" in m.__dict__ for m in linears)


@pytest.mark.parametrize("isa", kernels.isas() if kernels.available() else [])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_attention_rows_are_each_their_own_decoding_step(isa, dtype):
    """Query rows at consecutive positions over a cache's slots (a verification): each row's bits equal
    that row attended alone over exactly its keys (a decoding step), for grouped heads, odd head sizes
    and sliding windows; and within rounding of torch's attention."""
    g = torch.Generator().manual_seed(5)
    for hq, hkv, d, s, window in [(12, 2, 128, 70, 0), (4, 4, 33, 20, 0), (8, 2, 64, 90, 16)]:
        cache_k = torch.randn(1, hkv, s + 30, d, generator=g).to(dtype)  # a cache longer than what is read
        cache_v = torch.randn(1, hkv, s + 30, d, generator=g).to(dtype)
        k, v = cache_k[:, :, :s], cache_v[:, :, :s]
        rows = 9
        start = s - rows
        q = torch.randn(1, rows, hq, d, generator=g).to(dtype).transpose(1, 2)  # as attention modules make it
        out = kernels.attention(q, k, v, start, window, None, isa)
        assert out.shape == (1, rows, hq, d)
        for r in range(rows):
            end = start + r + 1
            alone = kernels.attention(q[:, :, r : r + 1], k[:, :, :end], v[:, :, :end], end - 1, window, None, isa)
            assert torch.equal(out[:, r : r + 1], alone), (hq, hkv, d, window, r)
            lo = max(0, end - window) if window else 0
            kk = k[:, :, lo:end].repeat_interleave(hq // hkv, 1).double()
            vv = v[:, :, lo:end].repeat_interleave(hq // hkv, 1).double()
            ref = torch.nn.functional.scaled_dot_product_attention(q[:, :, r : r + 1].double(), kk, vv)
            tol = dict(rtol=1e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(out[:, r : r + 1].double(), ref.transpose(1, 2), **tol)


def test_attention_refuses_what_it_cannot_compute():
    q = torch.randn(1, 4, 2, 8)
    k = torch.randn(1, 3, 5, 8)
    with pytest.raises(RuntimeError, match="multiple of key heads"):
        kernels.attention(q, k, k, 3)
    with pytest.raises(RuntimeError, match="need 7 keys, got 5"):
        kernels.attention(torch.randn(1, 3, 2, 8), k, k, 5)


@pytest.mark.skipif(not kernels.available() or "avx512bf16" not in kernels.isas(), reason="no AVX512-BF16/VNNI here")
def test_int8_on_vnni_sums_exactly_without_overflow_and_keeps_small_values():
    """The VNNI path quantizes each row of x to int16 with a bound that keeps every int32 lane from
    overflowing, even at the largest values everywhere over a long K; and a row with an outlier 1000
    times its other values still gets their contribution to within bf16's precision."""
    for k in (7, 33, 4096, 20000):
        q = torch.full((3, k), 127, dtype=torch.int8)
        q[1] = -127
        scale = torch.tensor([1.0, 0.5, 2.0])
        x = torch.full((2, k), 3.0e4).bfloat16()
        out = kernels.linear_int8(x, q, scale, None, "avx512bf16").double()
        ref = torch.nn.functional.linear(x.double(), q.double() * scale.double()[:, None])
        torch.testing.assert_close(out, ref, rtol=2**-7, atol=0)  # bf16 output: 8 bits
    g = torch.Generator().manual_seed(5)
    k = 1000
    x = torch.randn(4, k, generator=g)
    x[:, 17] = 1000.0  # an outlier channel, as real activations have
    w = torch.randn(64, k, generator=g)
    w[:, 17] = 0.0  # ... whose weights are zero here: the result is the other channels' alone
    scale = w.abs().amax(1) / 127
    q = (w / scale[:, None]).round().clamp(-128, 127).to(torch.int8)
    xb = x.bfloat16()
    out = kernels.linear_int8(xb, q, scale, None, "avx512bf16").double()
    ref = torch.nn.functional.linear(xb.double(), q.double() * scale.double()[:, None])
    # int16 steps of 1000 / 32767 on values of ~1: each term's error is below bf16 rounding's of the output
    torch.testing.assert_close(out, ref, rtol=2**-7, atol=0.05)


@pytest.mark.skipif(not kernels.available(), reason="the kernels could not be built here")
def test_int8_prefetch_changes_speed_never_bits(monkeypatch, tmp_path):
    """Prefetching the next block of weight rows gives the same bits; the choice is measured once per
    machine, kept, and CLASP_INT8_PREFETCH overrides it."""
    g = torch.Generator().manual_seed(6)
    before = kernels.set_int8_prefetch(False)
    try:
        for n, k in [(16, 64), (40, 1000), (333, 96)]:
            q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
            scale = torch.rand(n, generator=g) / 100
            x = torch.randn(3, k, generator=g).bfloat16()
            kernels.set_int8_prefetch(False)
            off = kernels.linear_int8(x, q, scale)
            assert kernels.set_int8_prefetch(True) is False
            assert torch.equal(kernels.linear_int8(x, q, scale), off)
        monkeypatch.setenv("CLASP_CACHE_DIR", str(tmp_path))
        calls = []
        monkeypatch.setattr(cpu_linear, "_measure_int8_prefetch", lambda: calls.append(1) or True)
        for forced, expected in (("", True), ("", True), ("0", False)):
            monkeypatch.setenv("CLASP_INT8_PREFETCH", forced)
            cpu_linear.int8_prefetch.cache_clear()
            assert cpu_linear.int8_prefetch() is expected
            assert kernels.set_int8_prefetch(expected) is expected  # what it applied
        assert calls == [1]  # measured once, then read back
    finally:
        cpu_linear.int8_prefetch.cache_clear()
        kernels.set_int8_prefetch(before)
