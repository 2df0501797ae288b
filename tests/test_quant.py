"""Quantized drafts: int8 / int4 copies of the draft's layers and head; the verifier keeps the model's own
weights, so the output is unchanged."""

from __future__ import annotations

import pytest
import torch

from clasp_decoding.config import GenerationConfig
from clasp_decoding.context import model_state
from clasp_decoding.quant import QuantLinear, draft_modules, extra_bytes, fused_available, quantized_copy, resolve
from conftest import ARCHS, hf_greedy, random_prompt, run_tokens, tiny_model


@pytest.mark.parametrize("kind, tolerance", [("int8", 0.02), ("int4", 0.15)])
def test_quantized_linear_is_close_to_the_original(kind, tolerance):
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 96, bias=True)
    x = torch.randn(3, 7, 256)
    with torch.inference_mode():
        ref = linear(x)
        fused = QuantLinear(linear, kind)(x)
        fallback = QuantLinear(linear, kind, fused=False)(x)
    assert fused.shape == ref.shape and fused.dtype == ref.dtype
    assert float((fused - ref).norm() / ref.norm()) < tolerance
    torch.testing.assert_close(fused, fallback, rtol=0.02, atol=0.02)  # the fused kernel computes what it should


def test_a_quantized_copy_shares_everything_but_the_linears():
    model = tiny_model("qwen2", seed=1)
    layer = model.model.layers[0]
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    clone = quantized_copy(layer, "int8")
    assert isinstance(clone.mlp.down_proj, QuantLinear) and isinstance(layer.mlp.down_proj, torch.nn.Linear)
    assert clone.input_layernorm is layer.input_layernorm and clone.self_attn.layer_idx == layer.self_attn.layer_idx
    assert all(torch.equal(before[k], v) for k, v in layer.state_dict().items())  # the original is untouched


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_quantized_drafts_keep_greedy_output(arch, quant):
    model = tiny_model(arch, seed=2)
    prompt = random_prompt(60, 8) * 2
    ref = hf_greedy(model, prompt, 32)
    for method, extra in (("clasp", {"num_skip": 2}), ("hybrid", {}), ("static", {"skip_layers": (1, 4)})):
        cfg = GenerationConfig(
            max_new_tokens=32, method=method, draft_quant=quant, draft_exit_threshold=0.0, draft_vocab=0, **extra
        )
        out, gen = run_tokens(model, prompt, cfg)
        assert out == ref, (arch, quant, method)
        assert method == "hybrid" or gen.stats.accepted > 0  # the quantized draft still proposes useful tokens


def test_the_dp_scores_the_draft_that_will_run(monkeypatch):
    """With a quantized draft, every candidate call of layer selection runs the quantized layer."""
    from clasp_decoding.runner import ModelRunner

    model = tiny_model("llama", seed=3)
    seen = []
    original = ModelRunner.layer_candidates

    def spy(self, cache, index, states, position, module=None):
        seen.append(module)
        return original(self, cache, index, states, position, module)

    monkeypatch.setattr(ModelRunner, "layer_candidates", spy)
    cfg = GenerationConfig(max_new_tokens=12, method="clasp", draft_quant="int4", num_skip=2, layer_opt_interval=2)
    run_tokens(model, random_prompt(61, 8), cfg)
    assert seen and all(isinstance(m.mlp.gate_proj, QuantLinear) for m in seen)


def test_memory_the_copies_add():
    model = tiny_model("llama", seed=4, hidden_size=128, intermediate_size=256, layers=4)
    state = model_state(model)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    added = {}
    for quant in ("int8", "int4"):
        layers, head = draft_modules(state, quant, None)
        added[quant] = (extra_bytes(layers) + extra_bytes([head.block])) / model_bytes
    assert added["int4"] < 0.30 * (4 / 2) and added["int4"] < added["int8"]  # fp32 here: half of the bf16 ratio
    assert added["int8"] < 0.55 * (4 / 2)


def test_auto_picks_int8_where_a_fused_kernel_exists():
    assert fused_available("int8", "cpu")
    assert resolve("auto", torch.device("cpu")) == "int8" and resolve("none", torch.device("cpu")) == "none"


@pytest.mark.parametrize(
    "seconds, expected",
    [
        ({"int4": 0.0, "int8": 1e-3}, "int4"),
        ({"int4": 1e-3, "int8": 0.0}, "int8"),
        ({"int4": 2e-3, "int8": 2e-3}, "none"),
    ],
)
def test_auto_on_a_gpu_quantizes_only_when_timing_shows_it_faster(monkeypatch, seconds, expected):
    """On a GPU ``auto`` times the model's own layer against its quantized copies and keeps a kind only
    when it is faster by 10% (torch's int8 weight-only kernel is not known to be fast there). The timing is
    run here on the CPU, with quantized copies that take a set time: the fastest wins, slow ones lose to the
    layer as it is."""
    import time

    from clasp_decoding import quant

    class Timed(torch.nn.Module):
        def __init__(self, layer, kind):
            super().__init__()
            self.seconds = seconds[kind]

        def forward(self, x):
            if self.seconds:
                time.sleep(self.seconds)
            return x

    monkeypatch.setattr(quant, "QuantLinear", Timed)
    monkeypatch.setattr(quant, "fused_available", lambda kind, device_type: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(quant, "_FASTEST", {})
    layer = torch.nn.Linear(512, 1024)
    calls = []
    real = quant._fastest_on
    monkeypatch.setattr(quant, "_fastest_on", lambda dev, sample: calls.append(dev) or real("cpu", sample))
    assert resolve("auto", torch.device("cuda:0"), layer) == expected
    assert resolve("auto", torch.device("cuda:0"), layer) == expected and calls == ["cuda:0"]  # timed once
    assert resolve("auto", torch.device("cuda:0"), None) == "none"  # nothing to time: no quantization


def test_a_device_mapped_model_takes_the_dtype_of_where_it_computes(monkeypatch):
    """The dtype of a ``device_map`` model is resolved for the device it computes on (as for CUDA when any
    module lands on a GPU), not by a CPU micro-benchmark."""
    from clasp_decoding.models import placement_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert placement_device("cpu", "auto") == "cuda"
    assert placement_device("cpu", {"model.embed_tokens": 0, "model.layers.0": "cpu"}) == "cuda"
    assert placement_device("cpu", {"model.layers.0": "cuda:1", "lm_head": "disk"}) == "cuda"
    assert placement_device("cpu", {"model.layers.0": "cpu", "lm_head": "disk"}) == "cpu"
    assert placement_device("cpu", "cpu") == "cpu"
    assert placement_device("cuda", None) == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert placement_device("cpu", "auto") == "cpu"
