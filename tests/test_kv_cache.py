"""The KV cache: written by position, rolled back by moving the valid length, never copied."""

from __future__ import annotations

import pytest
import torch

from clasp_decoding.config import GenerationConfig
from clasp_decoding.context import model_state
from clasp_decoding.decoding import Generation
from clasp_decoding.drafting.registry import make_drafter
from clasp_decoding.kv_cache import KVCache
from conftest import ARCHS, random_prompt, tiny_model


def test_update_writes_at_the_planned_slots_and_reads_a_view():
    cache = KVCache(num_layers=2, capacity=8, dtype=torch.float32)
    k = torch.arange(2 * 3 * 4, dtype=torch.float32).view(1, 2, 3, 4)
    cache.route(2, 3)
    keys, values = cache.update(k, -k, 1)
    assert keys.shape == (1, 2, 5, 4)
    assert torch.equal(keys[:, :, 2:5], k) and torch.equal(values[:, :, 2:5], -k)
    assert keys.data_ptr() == cache.keys[1].data_ptr()  # a view of the buffer, not a copy
    assert cache.keys[0] is None  # layers are allocated when first written
    with pytest.raises(IndexError, match="overflow"):
        cache.route(7, 2)
    with pytest.raises(ValueError):
        cache.rollback(9)


@pytest.mark.parametrize("arch", ARCHS)
def test_rollback_leaves_exactly_the_verified_state(arch):
    """After rounds with rejected drafts, the verified slots equal a fresh prefill of the same tokens,
    and the buffers were never reallocated."""
    model = tiny_model(arch, seed=5)
    state = model_state(model)
    runner = state.runner
    prompt = random_prompt(50, 9)
    cfg = GenerationConfig(max_new_tokens=30, method="clasp", num_skip=2, draft_exit_threshold=0.0, max_draft_tokens=6)
    gen = Generation(runner, prompt, cfg, make_drafter(cfg), model=state)
    session = gen.state
    pointers = None
    for i, _ in enumerate(gen):
        if i == 1:
            pointers = [t.data_ptr() for t in session.cache.keys]
    st = gen.stats
    assert st.drafted > st.accepted > 0  # some drafts were rejected, so rollback happened
    assert [t.data_ptr() for t in session.cache.keys] == pointers
    n = session.cache.length
    assert n == len(session.tokens) - 1
    fresh = runner.new_cache(n, 1)
    runner.forward(fresh, torch.tensor(session.tokens[:n]), 0)
    for layer in range(runner.num_layers):
        torch.testing.assert_close(
            session.cache.keys[layer][:, :, :n], fresh.keys[layer][:, :, :n], rtol=1e-4, atol=1e-5
        )
        torch.testing.assert_close(
            session.cache.values[layer][:, :, :n], fresh.values[layer][:, :, :n], rtol=1e-4, atol=1e-5
        )
