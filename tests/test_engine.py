"""The serving engine under pressure: caches that grow with the text, preemption and recomputation,
chunked prefills, prefix reuse, admission that never loses a request, per-token log-probabilities. Every
text is checked against the same request alone."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from pathlib import Path

import pytest
import torch

from clasp_decoding import generate
from clasp_decoding.batching import Batch, Member
from clasp_decoding.config import GenerationConfig
from clasp_decoding.context import runner_for
from clasp_decoding.engine import Engine, Job
from conftest import random_prompt, tiny_model


def collect(engine: Engine, requests, cancel=None, scopes=None):
    """Submit ``requests`` ((prompt ids, config) pairs) at once; each one's (kind, payload) events until
    it ends. ``cancel[i]``: cancel job ``i`` right after submitting it (or after that many seconds)."""

    async def main():
        loop = asyncio.get_running_loop()
        jobs = []
        for i, (p, c) in enumerate(requests):
            job = Job(p, c, loop, deadline=time.monotonic() + 300, scope=(scopes or {}).get(i))
            engine.submit(job)
            jobs.append(job)
            if cancel and cancel.get(i) == 0:
                job.cancel()

        async def events(i, job):
            out = []
            if cancel and cancel.get(i):
                loop.call_later(cancel[i], job.cancel)
            quiet = 0.0
            while True:
                try:
                    kind, payload = await asyncio.wait_for(job.events.get(), timeout=0.25)
                except asyncio.TimeoutError:
                    quiet += 0.25
                    if quiet >= (2 if job.cancelled.is_set() else 60):
                        return out + [("silence", None)]
                    continue
                quiet = 0.0
                out.append((kind, payload))
                if kind in ("done", "error", "timeout", "shutdown"):
                    return out

        return await asyncio.gather(*(events(i, j) for i, j in enumerate(jobs)))

    return asyncio.run(main())


def tokens_of(events) -> list[int]:
    return [t for k, p in events if k == "delta" for t in p.token_ids]


@pytest.fixture(scope="module")
def model():
    return tiny_model("qwen2", seed=11, dtype=torch.bfloat16, vocab=211, max_pos=512)


def configs(n):
    return [
        GenerationConfig(max_new_tokens=48, temperature=0.9 * (i % 2), seed=i, method=("hybrid", "ar", "clasp")[i % 3])
        for i in range(n)
    ]


def test_a_pool_too_small_for_everyone_preempts_and_recomputes_exactly(model):
    """Six requests whose caches together outgrow the pool: the scheduler preempts (the largest holder),
    recomputes later, and every text equals the request alone; nothing is left held."""
    runner = runner_for(model)
    prompts = [random_prompt(50 + i, 20 + 7 * i, 211) for i in range(6)]
    cfgs = configs(6)
    solo = [generate(model, None, p, c).token_ids for p, c in zip(prompts, cfgs, strict=True)]
    slots = 2 * (60 + 48 + runner.scratch_slots())  # about two requests' worth
    batch = Batch(runner, slots, max_batch=6, prefill_chunk=8)
    members = []
    from clasp_decoding.api import generation

    for p, c in zip(prompts, cfgs, strict=True):
        room = batch.cache_for(len(p), c.max_new_tokens, first=len(p) + 8)
        assert room is not None
        m = Member(generation(model, None, p, c, cache=room), on_error=lambda e: pytest.fail(str(e)))
        members.append(m)
        batch.join(m)
        if len(members) == 4:
            break
    waiting = list(zip(prompts[4:], cfgs[4:], strict=True))
    while batch.members or batch.evicted or waiting:
        for m in list(batch.evicted):
            if not batch.readmit(m):
                break
        if waiting and not batch.full:
            p, c = waiting[0]
            room = batch.cache_for(len(p), c.max_new_tokens)
            if room is not None:
                waiting.pop(0)
                m = Member(generation(model, None, p, c, cache=room))
                members.append(m)
                batch.join(m)
        batch.iterate()
        assert batch.pool.used <= batch.pool.slots
    assert batch.preemptions > 0
    assert [m.generation.result().token_ids for m in members] == solo
    assert batch.pool.used == 0


def test_chunked_prefills_and_prefix_reuse_give_the_texts_of_requests_alone(model):
    """Prompts joining running streams are filled a few tokens per pass; a second turn that starts with
    the first turn's prompt and answer reuses that cache (only the rest is filled); the texts equal the
    requests alone on a fresh engine with no reuse."""
    engine = Engine(model, None, max_batch=4, prefill_chunk=5, pool_tokens=4096)
    plain = Engine(model, None, max_batch=1, prefix_cache=False, pool_tokens=4096)
    try:
        assert engine.prefix.enabled and not plain.prefix.enabled
        first = [random_prompt(70 + i, 30 + 3 * i, 211) for i in range(3)]
        cfg = GenerationConfig(max_new_tokens=40, method="hybrid")
        turn1 = collect(engine, [(p, cfg) for p in first])
        answers = [tokens_of(e) for e in turn1]
        second = [p + a + random_prompt(90 + i, 9, 211) for i, (p, a) in enumerate(zip(first, answers, strict=True))]
        turn2 = collect(engine, [(p, cfg.updated(temperature=0.8, seed=5)) for p in second])
        alone = [tokens_of(collect(plain, [(p, c)])[0]) for p, c in [*((p, cfg) for p in first),
                 *((p, cfg.updated(temperature=0.8, seed=5)) for p in second)]]  # fmt: skip
    finally:
        engine.close()
        plain.close()
    assert answers + [tokens_of(e) for e in turn2] == alone
    reused = [next(p for k, p in e if k == "started")["reused"] for e in turn2]
    assert all(r >= len(p) + len(a) - 1 for r, p, a in zip(reused, first, answers, strict=True)), reused
    assert engine.stats.reused_tokens == sum(reused) and engine.prefix.hits >= 3


def test_prefixes_stay_within_their_scope(model):
    engine = Engine(model, None, max_batch=2, pool_tokens=4096)
    try:
        p = random_prompt(3, 40, 211)
        cfg = GenerationConfig(max_new_tokens=8, method="ar")
        collect(engine, [(p, cfg)], scopes={0: "alice"})
        bob = collect(engine, [(p + [5, 6], cfg)], scopes={0: "bob"})[0]
        alice = collect(engine, [(p + [5, 6], cfg)], scopes={0: "alice"})[0]
    finally:
        engine.close()
    assert bob[0] == ("started", {"queued": bob[0][1]["queued"], "reused": 0})
    assert alice[0][1]["reused"] >= 40


def test_a_thousand_admissions_with_random_cancels_lose_nothing():
    """Every request either finishes or was cancelled by its client; none waits forever, none is
    answered twice, and afterwards nothing runs and no cache block is held but the kept prefixes."""
    rng = random.Random(0)
    small = tiny_model("llama", seed=1, dtype=torch.bfloat16, vocab=211, layers=2)
    engine = Engine(small, None, max_batch=8, max_queue=1000, pool_tokens=2048)
    try:
        requests = [(random_prompt(rng.randrange(10**6), rng.randrange(1, 12), 211),
                     GenerationConfig(max_new_tokens=rng.randrange(1, 4), method="ar")) for _ in range(1000)]  # fmt: skip
        cancel = {i: rng.choice((0, 0.001, 0.01)) for i in range(1000) if rng.random() < 0.3}
        results = collect(engine, requests, cancel=cancel)
        deadline = time.monotonic() + 30
        while (engine.running or engine.queue_length()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.running == 0 and engine.queue_length() == 0
        assert engine.batch.pool.used == engine.prefix.slots
    finally:
        engine.close()
    for i, events in enumerate(results):
        ends = [k for k, _ in events if k in ("done", "error", "timeout", "shutdown")]
        if i in cancel:
            assert len(ends) <= 1 and "error" not in ends, (i, events)
        else:
            assert ends == ["done"], (i, events)


def thread_cpu_seconds(thread: threading.Thread) -> float:
    fields = Path(f"/proc/self/task/{thread.native_id}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux's /proc")
def test_the_worker_sleeps_when_nothing_can_run(model):
    """Idle, and with a job that cannot fit until a running one ends, the worker waits on its condition
    instead of spinning."""
    engine = Engine(model, None, max_batch=2, pool_tokens=512)
    try:
        before = thread_cpu_seconds(engine._thread)
        time.sleep(1.0)
        assert thread_cpu_seconds(engine._thread) - before < 0.2
        assert engine.alive and time.monotonic() - engine.heartbeat < 2.5
    finally:
        engine.close()
    assert not engine.alive


def test_a_failure_while_starting_gives_the_cache_back(model, monkeypatch):
    engine = Engine(model, None, max_batch=2, pool_tokens=1024, prefix_cache=False)
    try:
        import clasp_decoding.engine as engine_module

        def broken(*a, **k):
            raise RuntimeError("cannot build this generation")

        monkeypatch.setattr(engine_module, "generation", broken)
        events = collect(engine, [(random_prompt(1, 10, 211), GenerationConfig(max_new_tokens=4))])[0]
        assert events[-1][0] == "error" and "cannot build" in str(events[-1][1])
        assert engine.batch.pool.used == 0
    finally:
        engine.close()


def test_a_request_that_asks_for_many_tokens_does_not_hold_back_a_small_one(model):
    """A cache grows with its text: a request allowed 400 tokens takes a prompt's worth of the pool, so a
    small request behind it starts at once."""
    runner = runner_for(model)
    engine = Engine(model, None, max_batch=2, pool_tokens=500 + runner.scratch_slots(), prefix_cache=False)
    try:
        big = (random_prompt(1, 20, 211), GenerationConfig(max_new_tokens=460, min_new_tokens=460, method="ar"))
        small = (random_prompt(2, 20, 211), GenerationConfig(max_new_tokens=8, method="ar"))
        results = collect(engine, [big, small])
    finally:
        engine.close()
    small_start = next(p for k, p in results[1] if k == "started")
    assert results[0][-1][0] == "done" and len(tokens_of(results[0])) == 460
    big_took = results[0][-1][1].stats.time_total
    # held back, it would have waited for the big one's whole generation
    assert small_start["queued"] < 0.3 * big_took and results[1][-1][0] == "done", (small_start, big_took)


@pytest.mark.parametrize("method", ["ar", "clasp", "pld", "hybrid", "static"])
def test_logprobs_are_the_verifications_own_and_equal_plain_decodings(model, method):
    """Each new token's log-probability and its top alternatives come from the verification's rows: the
    very numbers plain decoding computes one token at a time, for every method, greedy and sampled."""
    prompt = random_prompt(8, 24, 211) * 2
    for sampling in (dict(), dict(temperature=0.8, seed=3)):
        cfg = GenerationConfig(max_new_tokens=30, logprobs=5, num_skip=2, **sampling)
        ref = generate(model, None, prompt, cfg.updated(method="ar"))
        got = generate(
            model, None, prompt, cfg.updated(method=method, skip_layers=(1, 2) if method == "static" else None)
        )
        assert got.token_ids == ref.token_ids
        assert len(got.logprobs) == len(got.token_ids)
        assert [(x.token_id, x.logprob, x.top) for x in got.logprobs] == [
            (x.token_id, x.logprob, x.top) for x in ref.logprobs
        ]
        top = ref.logprobs[0].top
        assert len(top) == 5 and top[0][1] >= top[-1][1]
        if not sampling:  # greedy: the chosen token is the most probable one
            assert all(x.top[0][0] == x.token_id for x in ref.logprobs)
