"""Independent references for the exactness tests: written apart from the code under test.

- :func:`reference_generate`: plain ``transformers`` decoding, one token per forward pass over a
  ``DynamicCache``, choosing each token itself (greedy argmax, or the position-keyed race), with its own
  end-of-sequence hold, stop-string check and length limit. It shares with the engine only the model
  (its numerics) and the race function.
- :func:`craft_seed`: splitmix64 is invertible, so a seed can be computed that gives any chosen hash
  bits to any chosen (token index, stage, id): the tests use it to force the largest possible uniform
  on an impossible token.
- :func:`byte_fallback_tokenizer`: a tokenizer like Llama-2's, Mistral's and Gemma's, where a character
  outside the vocabulary becomes one token per UTF-8 byte, and partial bytes decode to U+FFFD each.
"""

from __future__ import annotations

import torch

from clasp_decoding import noise

M64 = (1 << 64) - 1
STAGE_STEP = 0x632BE59BD9B4E019  # the stage multiplier of noise._row_keys (written out: an independent helper)


def _unshift(y: int, s: int) -> int:
    """Inverse of ``x ^ (x >> s)`` on 64-bit values."""
    x = y
    for _ in range(64 // s + 1):
        x = y ^ (x >> s)
    return x & M64


def unmix64(y: int) -> int:
    """The inverse of splitmix64's finalizer (:func:`noise.mix64_reference`)."""
    c1, c2 = noise._C1 & M64, noise._C2 & M64
    x = _unshift(y & M64, 31)
    x = (x * pow(c2, -1, 1 << 64)) & M64
    x = _unshift(x, 27)
    x = (x * pow(c1, -1, 1 << 64)) & M64
    return _unshift(x, 30)


def hashed_bits(seed: int, index: int, stage: int, ident: int) -> int:
    """The 64 hash bits the race draws for ``ident`` (a block or token id) at ``index`` and ``stage``,
    recomputed from the documented construction."""
    golden = noise._GOLDEN & M64
    stage_hash = noise.mix64_reference(seed + stage * STAGE_STEP)
    key = noise.mix64_reference(((index * golden) & M64) ^ stage_hash)
    return noise.mix64_reference(ident * golden + key)


def craft_seed(index: int, stage: int, ident: int, bits: int = M64) -> int:
    """A seed in ``[0, 2**64)`` whose race gives ``ident`` exactly these hash ``bits`` at ``index``."""
    golden = noise._GOLDEN & M64
    key = (unmix64(bits) - ident * golden) & M64
    stage_hash = unmix64(key) ^ ((index * golden) & M64)
    seed = (unmix64(stage_hash) - stage * STAGE_STEP) & M64
    assert hashed_bits(seed, index, stage, ident) == bits
    return seed


BLOCK_STAGE, TOKEN_STAGE = noise._BLOCK_STAGE, noise._TOKEN_STAGE


def _warp(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Temperature, top-k, top-p, written with ``transformers``' own processors."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    scores = TemperatureLogitsWarper(temperature)(None, logits[None].float())
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return torch.softmax(scores, -1)[0]


@torch.inference_mode()
def reference_generate(
    model,
    prompt: list[int],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    eos: frozenset[int] = frozenset(),
    min_new_tokens: int = 0,
    stop: tuple[str, ...] = (),
    tokenizer=None,
) -> list[int]:
    """The new tokens of plain decoding: one forward pass per token over a full ``DynamicCache``, on the
    model with the project's numerics installed (its kernels: the engine's arithmetic, not its loop)."""
    from transformers import DynamicCache

    from clasp_decoding.numerics import install

    install(model)
    cache = DynamicCache()
    ids = list(prompt)
    out: list[int] = []
    step = torch.tensor([ids])
    while len(out) < max_new_tokens:
        logits = model(input_ids=step, past_key_values=cache, use_cache=True).logits[0, -1].float()
        if len(out) < min_new_tokens:
            for e in eos:
                if e < logits.shape[-1]:
                    logits[e] = float("-inf")
        if temperature == 0:
            token = int(logits.argmax())
        else:
            probs = _warp(logits, temperature, top_k, top_p)
            token = int(noise.race(probs[None], seed, len(ids))[0])
        ids.append(token)
        out.append(token)
        if token in eos:
            break
        if stop and any(s in tokenizer.decode(out, skip_special_tokens=True) for s in stop):
            break
        step = torch.tensor([[token]])
    return out


def byte_fallback_tokenizer(extra_words: int = 0):
    """A SentencePiece-style BPE with byte fallback: ``<0x00>..<0xFF>`` tokens for whatever is not in the
    vocabulary, decoded like Llama-2's (``▁`` as space, bytes fused, partial bytes as U+FFFD each).
    ``extra_words`` adds filler tokens ``w0 ..`` so that a model can have a vocabulary of several blocks."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece in ["▁", "a", "b", "c", "e", "h", "l", "o", "p", "s", "t", "x", "st", "op", "stop", "▁a", "▁the", "."]:
        vocab.setdefault(piece, len(vocab))
    for i in range(extra_words):
        vocab.setdefault(f"w{i}", len(vocab))
    merges = [("s", "t"), ("o", "p"), ("st", "op"), ("▁", "a")]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
