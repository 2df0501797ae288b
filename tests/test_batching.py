"""Many users at once: every request's text is the text it gets alone, whatever it was batched with,
joined, left or failed beside; the cache pool and the batch size bound memory; the load policy keeps
drafting only where it pays."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from clasp_decoding import generate
from clasp_decoding.api import generation
from clasp_decoding.batching import Batch, LoadPolicy, Member, default_max_batch
from clasp_decoding.config import GenerationConfig
from clasp_decoding.context import runner_for
from clasp_decoding.costs import CostTable
from clasp_decoding.engine import Engine, Job
from clasp_decoding.errors import InputError
from clasp_decoding.kv_cache import KVPool, PoolShort
from conftest import ARCHS, random_prompt, tiny_model

# ----------------------------------------------------------------------------- the pool


def test_pool_caches_grow_with_the_text_and_the_pool_bounds_them():
    """A cache takes whole blocks as it is written, doubling up to its limit and keeping what it holds;
    the pool refuses what it has not (before anything is written); released and shrunk caches give their
    blocks back."""
    pool = KVPool(num_layers=2, slots=160, dtype=torch.float32)  # ten blocks of 16
    a = pool.allocate(10, limit=100)
    assert a.capacity == 16 and pool.used == 16
    k = torch.randn(1, 3, 12, 8)
    a.write(1, k, k, 0)
    a.write(1, k[:, :, :4], k[:, :, :4], 12)  # slots 12..15: still the first block
    assert a.capacity == 16 and a.keys[0] is None  # a layer's buffer is made at its first write
    a.write(1, k, k, 16)  # slot 27: doubled to 32
    assert a.capacity == 32 and pool.used == 32 and a.keys[1].shape == (1, 3, 32, 8)
    assert torch.equal(a.keys[1][:, :, :12], k) and torch.equal(a.keys[1][:, :, 16:28], k)
    b = pool.allocate(100, limit=200)
    assert b.capacity == 112 and pool.used == 144
    with pytest.raises(PoolShort):
        a.ensure(70)  # 112 + 80 > 160: refused, nothing changed
    assert a.capacity == 32 and pool.used == 144
    assert pool.allocate(40, limit=50) is None
    with pytest.raises(IndexError, match="limited to 100"):
        a.ensure(101)
    pool.release(b)
    pool.release(b)  # twice is once
    assert pool.used == 32
    a.ensure(70)
    assert a.capacity == 80 and torch.equal(a.keys[1][:, :, 16:28], k)  # grew to what it needed (64 < 70)
    a.length = 28
    a.shrink(28)
    assert a.capacity == 32 and pool.used == 32 and torch.equal(a.keys[1][:, :, 16:28], k)


# ----------------------------------------------------------------------------- text independent of the batch

SETTINGS = [dict(), dict(temperature=0.9, seed=7), dict(temperature=1.0, top_k=20, seed=2**63)]


def prompts_for(vocab: int = 97) -> list[list[int]]:
    return [random_prompt(40 + i, 4 + 5 * i, vocab) * 2 for i in range(6)]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("setting", range(len(SETTINGS)))
def test_batched_text_equals_solo_text(arch, setting):
    """Six requests (different lengths, hybrid drafting, stop rules) together, and in batches of three:
    each one's tokens equal its tokens alone."""
    model = tiny_model(arch, seed=5, dtype=torch.bfloat16)
    assert runner_for(model).batchable
    cfg = GenerationConfig(max_new_tokens=40, **SETTINGS[setting])
    prompts = prompts_for()
    solo = [generate(model, None, p, cfg).token_ids for p in prompts]
    for size in (len(prompts), 3):
        together = generate(model, None, prompts, cfg, max_batch=size)
        assert [r.token_ids for r in together] == solo, (arch, setting, size)


def member(model, prompt, cfg, batch, **kw) -> Member:
    room = batch.cache_for(len(prompt), cfg.max_new_tokens)
    return Member(generation(model, None, prompt, cfg, cache=room), **kw)


def test_joins_leaves_cancellations_and_a_failing_neighbour():
    """Requests join at different iterations, one is cancelled mid-way, one fails mid-way (its drafter
    raises): every other request's tokens equal its solo tokens, and the failure is reported to its own
    request only."""
    model = tiny_model("qwen2", seed=6, dtype=torch.bfloat16)
    runner = runner_for(model)
    prompts = prompts_for()
    cfgs = [GenerationConfig(max_new_tokens=30 + 5 * i, temperature=0.8 if i % 2 else 0.0, seed=i) for i in range(6)]
    solo = [generate(model, None, p, c).token_ids for p, c in zip(prompts, cfgs, strict=True)]
    batch = Batch(runner, pool_slots=6 * 200, max_batch=6)
    stop = {"flag": False}
    errors: dict[int, BaseException] = {}
    members = {}
    for it in range(200):
        for i, when in enumerate((0, 0, 2, 5, 9, 9)):
            if when == it and i not in members:
                members[i] = member(
                    model, prompts[i], cfgs[i], batch, on_error=lambda e, i=i: errors.setdefault(i, e),
                    cancelled=(lambda: stop["flag"]) if i == 3 else (lambda: False),
                )  # fmt: skip
                batch.join(members[i])
        if it == 12:
            stop["flag"] = True  # request 3 leaves mid-way
        if it == 11:  # request 4's drafter breaks at its next round

            def broken(state, max_tokens):
                raise RuntimeError("a drafter bug")

            members[4].generation.drafter.propose = broken
        batch.iterate()
        if it > 12 and not batch.members:
            break
    assert set(errors) == {4} and "drafter bug" in str(errors[4])
    assert members[3].generation.finish_reason == "cancelled"
    for i in (0, 1, 2, 5):
        assert members[i].generation.result().token_ids == solo[i], i
    assert batch.pool.used == 0  # every cache given back


def test_a_failing_pass_is_retried_apart(monkeypatch):
    """When the shared pass itself fails, each request's rows run alone (the same bits, by row-invariant
    kernels); a request whose rows fail alone gets the error, the others go on unchanged."""
    model = tiny_model("llama", seed=7, dtype=torch.bfloat16)
    runner = runner_for(model)
    prompts = prompts_for()[:3]
    cfg = GenerationConfig(max_new_tokens=20)
    solo = [generate(model, None, p, cfg).token_ids for p in prompts]
    batch = Batch(runner, pool_slots=3 * 200, max_batch=3)
    errors = []
    members = [member(model, p, cfg, batch, on_error=errors.append) for p in prompts]
    for m in members:
        batch.join(m)
    real = runner.forward_batch
    poisoned = members[1].generation.state.cache

    def flaky(segments):
        if any(cache is poisoned for cache, *_ in segments) and members[1].generation.stats.steps > 3:
            raise RuntimeError("rows that cannot be computed")
        return real(segments)

    monkeypatch.setattr(runner, "forward_batch", flaky)
    batch.run()
    assert len(errors) == 1 and "cannot be computed" in str(errors[0])
    assert [members[i].generation.result().token_ids for i in (0, 2)] == [solo[0], solo[2]]


# ----------------------------------------------------------------------------- the threaded engine


def run_jobs(engine: Engine, requests: list[tuple[list[int], GenerationConfig]], cancel_after=None):
    """Submit all requests at once; collect each one's events. ``cancel_after``: cancel job ``i`` after its
    ``n``-th text piece."""

    async def main():
        loop = asyncio.get_running_loop()
        jobs = [Job(p, c, loop, deadline=time.monotonic() + 120) for p, c in requests]
        for j in jobs:
            engine.submit(j)

        async def collect(i, job):
            events = []
            while True:
                kind, payload = await job.events.get()
                if kind == "started":
                    continue
                events.append((kind, payload.text if kind == "delta" else payload))
                if cancel_after and cancel_after[0] == i and kind == "delta" and len(events) >= cancel_after[1]:
                    job.cancel()
                    return events
                if kind in ("done", "error", "timeout", "shutdown"):
                    return events

        return await asyncio.gather(*(collect(i, j) for i, j in enumerate(jobs)))

    return asyncio.run(main())


def test_the_engine_serves_many_at_once_within_its_bounds(tiny_model_dir):
    """Eight requests on an engine of batch 4 and a pool too small for four long ones at a time: at most
    four run, the pool is never exceeded, requests wait for room, one too large for the pool fails with a
    message, and every response is its solo text."""
    from clasp_decoding import load

    model, tok = load(str(tiny_model_dir), dtype="bf16")
    runner = runner_for(model)
    engine = Engine(model, tok, max_batch=4, pool_tokens=3 * (60 + 40 + runner.scratch_slots()))
    seen = {"running": 0, "used": 0}
    step = engine.batch.iterate

    def watched():
        seen["running"] = max(seen["running"], engine.running)
        seen["used"] = max(seen["used"], engine.batch.pool.used)
        step()

    engine.batch.iterate = watched
    try:
        prompts = [tok(f"A hash table maps keys {i} " * (1 + i % 3))["input_ids"] for i in range(8)]
        cfgs = [GenerationConfig(max_new_tokens=40, temperature=0.7 * (i % 2), seed=i) for i in range(8)]
        solo = [generate(model, tok, p, c).text for p, c in zip(prompts, cfgs, strict=True)]
        too_big = (list(range(5, 400)), GenerationConfig(max_new_tokens=40))
        results = run_jobs(engine, [*zip(prompts, cfgs, strict=True), too_big])
    finally:
        engine.close()
    for i in range(8):
        kinds = [k for k, _ in results[i]]
        assert kinds[-1] == "done", results[i][-1]
        assert "".join(p for k, p in results[i] if k == "delta") == results[i][-1][1].text == solo[i], i
    kind, err = results[8][-1]
    assert kind == "error" and isinstance(err, InputError) and "cache pool holds" in str(err)
    assert 2 <= seen["running"] <= 4 and seen["used"] <= engine.batch.pool.slots


def test_a_cancelled_request_leaves_and_frees_its_slots(tiny_model_dir):
    from clasp_decoding import load

    model, tok = load(str(tiny_model_dir), dtype="bf16")
    engine = Engine(model, tok, max_batch=3)
    try:
        prompts = [tok(f"Recursion {i} is")["input_ids"] for i in range(3)]
        cfg = GenerationConfig(max_new_tokens=120)
        solo = [generate(model, tok, p, cfg).text for p in prompts]
        long = GenerationConfig(max_new_tokens=400, min_new_tokens=400)  # far from done when it is cancelled
        results = run_jobs(engine, [(p, long if i == 1 else cfg) for i, p in enumerate(prompts)], cancel_after=(1, 2))
        deadline = time.time() + 10
        while engine.running and time.time() < deadline:
            time.sleep(0.05)
        assert engine.running == 0 and engine.batch.pool.used == engine.prefix.slots  # only kept prefixes
        assert engine.stats.requests["cancelled"] == 1
    finally:
        engine.close()
    for i in (0, 2):
        assert results[i][-1][0] == "done" and results[i][-1][1].text == solo[i]


# ----------------------------------------------------------------------------- the load policy


def test_the_load_policy_keeps_the_best_draft_limit_and_probes_its_neighbours():
    policy = LoadPolicy(trial=3, probe_every=10)
    rates = {0: 10.0, 1: 13.0, 2: 12.0, 4: 9.0, 8: 6.0}  # one draft token each pays most at this size
    picks = []
    for _ in range(120):
        arm = policy.limit(8, 7)
        picks.append(arm)
        policy.observe(8, arm, int(rates[arm]), 1.0)
    assert 8 not in picks  # it does not fit: 8 x (1 + 8) rows is over a pass's 64
    steady = picks[20:]
    assert steady.count(1) >= len(steady) * 7 // 8  # the rest are probes
    assert {0, 2} <= set(steady) and 4 not in steady  # probes go to the neighbours only
    rates[2], rates[4] = 14.0, 16.0  # the text moved: longer drafts win now
    picks = []
    for _ in range(400):  # probes see it, and it takes over once their discounted rate is ahead
        arm = policy.limit(8, 7)
        picks.append(arm)
        policy.observe(8, arm, int(rates[arm]), 1.0)
    assert picks[-40:].count(4) >= 34
    assert policy.limit(60, 0) == 0  # no room for drafts: plain
    shared = [policy.limit(size, 7) for size in (5, 6, 7) * 5]
    assert shared.count(4) >= 13  # sizes 5-8 share what was measured (the rest are probes)


def test_default_batch_size_follows_measured_costs():
    model = tiny_model("llama", seed=1, dtype=torch.bfloat16)
    runner = runner_for(model)
    cheap = CostTable({0: 1.0, 1: 1.02, 3: 1.1, 6: 1.3, 8: 1.45, 12: 1.8, 16: 2.3})
    steep = CostTable({0: 1.0, 1: 2.0, 3: 4.0, 6: 7.0})
    assert default_max_batch(runner, cheap) == 8  # 16 rows would cost more than two steps
    assert default_max_batch(runner, steep) == 2
    assert default_max_batch(runner, None) == 1
