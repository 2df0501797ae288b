"""Prompts, streaming text pieces, stop strings."""

from __future__ import annotations

import torch

from clasp_decoding import generate, load, stream
from clasp_decoding.api import eos_ids_of
from clasp_decoding.baselines import hf_generate
from clasp_decoding.config import GenerationConfig
from clasp_decoding.text import IncrementalDecoder, encode_prompt


def test_pieces_are_whole_characters(tiny_tokenizer):
    text = "Café naïve 東京 ✓ über"
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text.split())  # multi-byte characters really are split across tokens
    dec = IncrementalDecoder(tiny_tokenizer)
    pieces = []
    for t in ids:
        piece, cut = dec.add([t])
        assert cut is None and "\ufffd" not in piece
        pieces.append(piece)
    pieces.append(dec.flush())
    assert "".join(pieces) == text
    assert sum(1 for p in pieces if p == "") > 0  # something was held back at least once


def test_stop_string_spanning_tokens(tiny_tokenizer):
    ids = tiny_tokenizer("the lazy dog jumps", add_special_tokens=False)["input_ids"]
    dec = IncrementalDecoder(tiny_tokenizer, stop=["zy do"])
    out, cut_round = "", None
    for i, t in enumerate(ids):
        piece, cut = dec.add([t])
        out += piece
        if cut is not None:
            cut_round = i
            break
    assert dec.stopped and out == "the la" and dec.text == "the la"
    assert tiny_tokenizer.decode(ids[: cut_round + 1]).find("zy do") >= 0
    assert tiny_tokenizer.decode(ids[:cut_round]).find("zy do") < 0


def test_chat_template_and_raw(tiny_tokenizer):
    chat = encode_prompt(tiny_tokenizer, "hello")
    raw = encode_prompt(tiny_tokenizer, "hello", raw=True)
    assert len(chat) > len(raw)
    assert tiny_tokenizer.decode(chat).startswith("<|user|>hello")
    msgs = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
        {"role": "user", "content": "and?"},
    ]
    assert tiny_tokenizer.decode(encode_prompt(tiny_tokenizer, msgs)).endswith("<|assistant|>")
    assert encode_prompt(tiny_tokenizer, [5, 6, 7]) == [5, 6, 7]


def test_generate_with_stop_strings_matches_transformers(tiny_model_dir):
    model, tok = load(str(tiny_model_dir), dtype="fp32")
    prompt = "A hash table maps keys"
    free = generate(model, tok, prompt, max_new_tokens=40, method="ar")
    assert len(free.text) > 12
    stop = free.text[8:11]
    first = free.text.find(stop)
    for method in ("clasp", "pld", "ar"):
        res = generate(model, tok, prompt, max_new_tokens=40, method=method, stop=[stop], num_skip=2)
        assert res.finish_reason == "stop"
        assert res.text == free.text[:first]
        assert res.token_ids == free.token_ids[: len(res.token_ids)]
        assert stop in tok.decode(res.token_ids)
    cfg = GenerationConfig(max_new_tokens=40, stop=(stop,))
    ids = encode_prompt(tok, prompt)
    ref, _ = hf_generate(model, tok, ids, cfg, eos_ids_of(model, tok))
    assert res.token_ids == ref


def test_stream_yields_the_same_text_as_generate(tiny_model_dir):
    model, tok = load(str(tiny_model_dir), dtype="fp32")
    pieces = list(stream(model, tok, "Recursion is", max_new_tokens=30))
    whole = generate(model, tok, "Recursion is", max_new_tokens=30)
    assert "".join(pieces) == whole.text
    assert len(pieces) > 1
    seen = []
    again = generate(model, tok, "Recursion is", max_new_tokens=30, callback=seen.append)
    assert "".join(seen) == again.text == whole.text
    assert whole.finish_reason in ("stop", "length")
    st = whole.stats
    assert st.new_tokens == len(whole.token_ids) and st.steps >= 1 and st.time_total > 0


def test_eos_ends_with_finish_reason_stop(tiny_model_dir):
    model, tok = load(str(tiny_model_dir), dtype="fp32")
    free = generate(model, tok, [1, 40, 41, 42], max_new_tokens=20, method="ar")
    eos = free.token_ids[6]
    model.generation_config.eos_token_id = [tok.eos_token_id, eos]
    try:
        res = generate(model, tok, [1, 40, 41, 42], max_new_tokens=20)
    finally:
        model.generation_config.eos_token_id = tok.eos_token_id
    assert res.finish_reason == "stop" and res.token_ids[-1] == eos
    assert res.token_ids == free.token_ids[: len(res.token_ids)]
    assert torch.tensor(res.token_ids).numel() <= 7
