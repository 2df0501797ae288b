"""The GPU path proven on the CPU: the graph runner captures and replays through the CUDA-graph stand-in
(:mod:`clasp_decoding.graph_emulation`) and must equal the same static code run eagerly, bit for bit, for
every graph it can make, on first use and later; at most one host sync per draft step and per
verification; no capture inside a round; multi-device models on the eager runner."""

from __future__ import annotations

import copy

import pytest
import torch

from clasp_decoding import graph_emulation as ge
from clasp_decoding.config import GenerationConfig
from clasp_decoding.context import runner_for, use_graphs
from clasp_decoding.graph_runner import BUCKETS, GraphRunner
from clasp_decoding.quant import draft_modules
from clasp_decoding.state import ModelState
from conftest import ARCHS, random_prompt, run_tokens, tiny_model

# ----------------------------------------------------------------------------- the stand-in itself


def capture(fn) -> ge.CUDAGraph:
    g = ge.CUDAGraph()
    with ge.graph(g):
        fn()
    return g


def test_capture_runs_nothing_and_replay_reads_current_contents():
    x, out = torch.ones(4), torch.zeros(4)

    def step():
        x.add_(1)
        out.copy_(x * 2)

    g = capture(step)
    assert torch.equal(x, torch.ones(4)) and torch.equal(out, torch.zeros(4))  # a capture leaves no trace
    g.replay()
    assert torch.equal(x, torch.full((4,), 2.0)) and torch.equal(out, torch.full((4,), 4.0))
    x.fill_(10)
    g.replay()
    assert torch.equal(out, torch.full((4,), 22.0))  # the buffers' current contents


def test_python_changes_do_not_reach_a_replay():
    state = {"scale": 2.0}
    x, out = torch.ones(3), torch.zeros(3)
    g = capture(lambda: out.copy_(x * state["scale"]))
    state["scale"] = 5.0
    g.replay()
    assert torch.equal(out, torch.full((3,), 2.0))


def test_a_freed_or_resized_buffer_is_an_error_at_replay():
    holder = {"buf": torch.zeros(2, 5)}
    x = torch.ones(2, 5)
    g = capture(lambda: holder["buf"].copy_(x))
    holder["buf"] = torch.zeros(1, 5)  # reallocated: the captured one is gone
    with pytest.raises(ge.GraphError, match="freed since the capture"):
        g.replay()
    buf = torch.zeros(6)
    g2 = capture(lambda: buf.add_(1))
    buf.resize_(12)
    with pytest.raises(ge.GraphError, match="reallocated or resized"):
        g2.replay()


@pytest.mark.parametrize(
    "sync",
    [
        lambda x: float(x.sum()),
        lambda x: x.tolist(),
        lambda x: x.cpu(),
        lambda x: x.nonzero(),
        lambda x: x[x > 0],
        lambda x: torch.equal(x, x),
        lambda x: x.unique(),
    ],
)
def test_a_host_sync_inside_a_capture_is_an_error(sync):
    x = torch.ones(3)
    with pytest.raises(ge.GraphError, match="host sync"), ge.graph(ge.CUDAGraph()):
        sync(x)
    assert x.tolist() == [1.0, 1.0, 1.0]  # and outside a capture everything is back


def test_what_a_capture_allocates_is_garbage_until_a_replay_writes_it():
    x = torch.ones(3)
    held = {}
    g = capture(lambda: held.setdefault("y", x * 3))
    assert torch.isnan(held["y"]).all()  # read before any replay: not a value
    g.replay()
    assert torch.equal(held["y"], torch.full((3,), 3.0))
    x.fill_(2)
    g.replay()
    assert torch.equal(held["y"], torch.full((3,), 6.0))  # every replay overwrites the graph's memory


# ----------------------------------------------------------------------------- every graph, bit for bit


def pair(arch: str, prepared: bool, **kw):
    """The graph runner capturing through the stand-in, and the same static code with capture off, on two
    copies of one model."""
    model = tiny_model(arch, seed=2, dtype=torch.bfloat16, **kw)
    twin = copy.deepcopy(model)
    emulated = GraphRunner(model, 160, capture=True)
    eager = GraphRunner(twin, 160, capture=False)
    if prepared:
        emulated.prepare()
    return model, twin, emulated, eager


def same(a, b, what):
    for x, y in zip(a, b, strict=True):
        if x is None and y is None:
            continue
        assert torch.equal(x, y), what


def every_call(runner: GraphRunner, model_state: ModelState, prompt: list[int]) -> list:
    """Every kind of call a generation makes, in order, twice over (first use and later): prefill with
    hidden states, verifications in every bucket (with and without hidden states), draft steps with a
    skip set, through quantized int8 and int4 layers, and DP candidates in chunks."""
    out = []
    cache = runner.new_cache(len(prompt), 100)
    ids = torch.tensor(prompt)
    g = torch.Generator().manual_seed(0)
    try:
        for _ in range(2):
            cache.rollback(0)
            out.append(runner.forward(cache, ids, 0, last_only=True, collect_hidden=True))
            pos = len(prompt)
            for q in (1, 2, 3, 5, 8, 13, 16, 30, 33, 64):
                cache.rollback(pos)
                tokens = torch.randint(3, 90, (q,), generator=g)
                out.append(runner.forward(cache, tokens, pos, collect_hidden=q % 2 == 1))
            cache.rollback(pos)
            keep = [0, 2, 3]
            out.append(runner.forward(cache, ids[:1], pos, layers=keep, last_only=True))
            for kind in ("int8", "int4"):
                layers, _ = draft_modules(model_state, kind, None)
                runner.prepare(layers)
                out.append(runner.forward(cache, ids[:1], pos, layers=keep, last_only=True, modules=layers))
            states = torch.randn(40, runner.config.hidden_size, generator=g).bfloat16()  # two chunks of 32
            for i in runner.all_layers:
                out.append((runner.layer_candidates(cache, i, states, pos - 1),))
            out.append((torch.cat([k[:, :, : pos + 70] for k in cache.keys]),))
    finally:
        runner.release_cache(cache)
    return out


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("prepared", [False, True])
def test_every_graph_equals_the_static_code_run_eagerly(arch, prepared):
    """Captured lazily (first use inside a call: the warm-up and the replay both happen then) or up
    front: every output and every cache slot equals capture-off, bit for bit."""
    model, twin, emulated, eager = pair(arch, prepared, layers=4)
    prompt = random_prompt(5, 20)
    got = every_call(emulated, ModelState(emulated), prompt)
    want = every_call(eager, ModelState(eager), prompt)
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        same(a, b, f"call {i}")
    assert emulated.late_captures == (0 if prepared else emulated.late_captures)


def test_int8_and_int4_drafts_never_share_a_graph():
    model, twin, emulated, eager = pair("qwen2", True, layers=4)
    state = ModelState(emulated)
    keys_before = set(emulated._graphs)
    for kind in ("int8", "int4"):
        emulated.prepare(draft_modules(state, kind, None)[0])
    added = set(emulated._graphs) - keys_before
    assert {k[-1] for k in added if k[0] == "layer"} == {"int8", "int4"}


@pytest.mark.parametrize("method", ["ar", "clasp", "pld", "hybrid"])
def test_generation_through_captured_graphs_equals_capture_off(method):
    """The loop end to end (greedy and seeded), with a quantized draft: the same tokens as the static code
    run eagerly, and no graph captured inside a round."""
    model = tiny_model("llama", seed=3, dtype=torch.bfloat16, layers=6)
    twin = copy.deepcopy(model)
    use_graphs(model, capacity=160, capture=True)
    use_graphs(twin, capacity=160, capture=False)
    prompt = random_prompt(9, 12) * 2
    for sampling in (dict(), dict(temperature=0.8, seed=5)):
        cfg = GenerationConfig(
            max_new_tokens=40,
            method=method,
            num_skip=2,
            draft_exit_threshold=0.0,
            layer_opt_interval=3,
            draft_quant="int8",
            lookup_min_ngram=1,
            **sampling,
        )
        a, _ = run_tokens(model, prompt, cfg)
        b, _ = run_tokens(twin, prompt, cfg)
        assert a == b, (method, sampling)
    assert runner_for(model).late_captures == 0


def test_buckets_cover_the_longest_verification():
    """Lookup drafts and the cost ladder fit in the largest bucket; the loop never verifies more rows."""
    from clasp_decoding.config import GenerationConfig as C
    from clasp_decoding.costs import LADDER

    assert BUCKETS[-1] >= max(LADDER) + 1 and BUCKETS[-1] >= C().hybrid_max_lookup + 1
    model = tiny_model("llama", seed=4, layers=3)
    use_graphs(model, capacity=300, capture=False)
    prompt = random_prompt(10, 20) * 6  # long matches: lookup wants long drafts
    cfg = GenerationConfig(max_new_tokens=120, method="pld", lookup_max_tokens=200)
    _, gen = run_tokens(model, prompt, cfg)
    assert max(gen.stats.draft_lengths) <= BUCKETS[-1] - 1


def test_a_long_prompt_keeps_only_its_last_rows_states(monkeypatch):
    """A prompt beyond the largest bucket runs eagerly in one call; for the prefill it keeps one row of
    hidden states per layer, not one per token."""
    from clasp_decoding import graph_runner as gr
    from clasp_decoding.runner import ModelRunner

    rows = []
    init = gr._Bucket.__init__

    def spy(self, runner, size, with_states=True, state_rows=None, exits=True):
        init(self, runner, size, with_states, state_rows, exits)
        if self.states is not None:
            rows.append(self.states.shape[1])

    model = tiny_model("qwen2", seed=5, layers=3)
    runner = GraphRunner(model, 200, capture=False)
    monkeypatch.setattr(gr._Bucket, "__init__", spy)
    ids = torch.tensor(random_prompt(11, 100))
    logits, hidden = runner.forward(runner.new_cache(100, 10), ids, 0, last_only=True, collect_hidden=True)
    assert rows == [1] and hidden.shape == (4, 1, model.config.hidden_size)
    from conftest import scratch_cache

    eager = ModelRunner(model)
    ref_logits, ref_hidden = eager.forward(scratch_cache(eager, 120), ids, 0, last_only=True, collect_hidden=True)
    assert ref_hidden.shape == hidden.shape
    torch.testing.assert_close(hidden, ref_hidden, rtol=1e-4, atol=1e-4)


def test_a_model_over_several_devices_runs_on_the_eager_runner(monkeypatch):
    """A device_map'd model (every 70B set-up) gets the eager runner, with a warning, not an error."""
    from clasp_decoding import runner as runner_module
    from conftest import hf_greedy

    model = tiny_model("llama", seed=6, layers=4)
    second = {id(p) for layer in model.model.layers[2:] for p in layer.parameters()}
    real = runner_module.module_device

    def placed(module):
        params = list(module.parameters())
        return torch.device("cpu", 0) if params and id(params[0]) in second else real(module)

    monkeypatch.setattr(runner_module, "module_device", placed)
    with pytest.warns(UserWarning, match="several devices"):
        state = use_graphs(model, capacity=64)
    assert not isinstance(state.runner, GraphRunner) and not state.runner.single_device
    prompt = random_prompt(12, 8)
    out, _ = run_tokens(model, prompt, GenerationConfig(max_new_tokens=16, method="clasp", num_skip=2))
    assert out == hf_greedy(model, prompt, 16)


# ----------------------------------------------------------------------------- host syncs per round

SYNCS = ("item", "tolist", "__int__", "__float__", "__bool__", "__index__", "cpu", "numpy")


@pytest.mark.parametrize("graphs", [False, True])
@pytest.mark.parametrize("method", ["clasp", "pld", "hybrid", "ar"])
def test_at_most_one_sync_per_draft_step_and_per_verification(monkeypatch, graphs, method):
    """Counted by wrapping every tensor-to-host call: a round may sync once per draft step, once for its
    verification and once per layer selection (the DP's decisions), no more."""
    model = tiny_model("qwen2", seed=7, dtype=torch.bfloat16, layers=5)
    if graphs:
        use_graphs(model, capacity=200, capture=True)
    prompt = random_prompt(13, 10) * 2
    counted = [0]
    for name in SYNCS:
        original = getattr(torch.Tensor, name)

        def wrapper(self, *a, _original=original, **k):
            counted[0] += 1
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, wrapper)
    for sampling in (dict(), dict(temperature=0.9, seed=3)):
        cfg = GenerationConfig(
            max_new_tokens=30,
            method=method,
            num_skip=2,
            draft_exit_threshold=0.0,
            layer_opt_interval=4,
            lookup_min_ngram=1,
            **sampling,
        )
        from clasp_decoding.api import generation

        gen = generation(model, None, prompt, cfg)
        gen.step()  # the prefill
        checked = 0
        while not gen.done:
            counted[0] = 0
            steps_before, selections_before = gen.stats.drafted, gen.stats.layer_selections
            draft_lengths = len(gen.stats.draft_lengths)
            gen.step()
            if len(gen.stats.draft_lengths) == draft_lengths:
                continue
            source = gen.stats.modes[-1]
            draft_steps = gen.stats.drafted - steps_before if source == "clasp" else 0
            selections = gen.stats.layer_selections - selections_before
            assert counted[0] <= draft_steps + 1 + selections, (method, sampling, counted[0], draft_steps, selections)
            checked += 1
        assert checked > 3
