"""One argument for Hugging Face users: ``model.generate(..., custom_generate=clasp_generate)``.

``transformers`` 5 calls a ``custom_generate`` callable in place of its own decoding loop, after it has
prepared the generation config, the logits processors and the stopping criteria. This adapter reads
what it can honour from them and runs CLaSp's loop (:class:`~.decoding.Generation`) on the model's own
modules; options it cannot honour are refused with an error that names them, never ignored.

- honoured: ``max_new_tokens`` / ``max_length``, ``min_new_tokens`` / ``min_length``, ``eos_token_id``,
  ``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``stopping_criteria`` (checked after every
  token of a round), ``streamer``, ``return_dict_in_generate`` (``sequences``), an ``attention_mask``
  with padding, batch size 1;
- CLaSp's options as keyword arguments: ``clasp_method`` and any :class:`~.config.GenerationConfig`
  field (``skip_ratio``, ``num_skip``, ``draft_exit_threshold``, ...);
- a seed set with ``torch.manual_seed`` / ``transformers.set_seed`` reproduces the text (sampling is
  position-keyed with a seed drawn from torch's global generator).

Greedy output equals ``model.generate`` token for token, with the numerics this project installs on
the model at its first use (they change which kernels run, not what is computed; docs/numerics in the
README).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from .config import GenerationConfig
from .context import model_state
from .decoding import Generation
from .drafting.registry import make_drafter
from .errors import ConfigError

_HONOURED_PROCESSORS = {
    "TemperatureLogitsWarper",
    "TopKLogitsWarper",
    "TopPLogitsWarper",
    "MinLengthLogitsProcessor",
    "MinNewTokensLengthLogitsProcessor",
}
_HANDLED_CRITERIA = {"MaxLengthCriteria", "EosTokenCriteria"}
_REFUSED_FLAGS = (
    ("num_beams", 1, "beam search"),
    ("num_return_sequences", 1, "several sequences per prompt"),
    ("output_scores", False, "scores"),
    ("output_logits", False, "logits"),
    ("output_attentions", False, "attentions"),
    ("output_hidden_states", False, "hidden states"),
    ("prompt_lookup_num_tokens", None, "transformers' prompt lookup (use clasp_method='pld')"),
)


def _streamer_of_caller():
    """The ``streamer`` argument of the enclosing ``generate`` call: ``transformers`` does not pass it
    to a ``custom_generate`` callable (it only puts the prompt into it), so it is read from that frame."""
    frame = inspect.currentframe()
    while frame is not None:
        code = frame.f_code
        if code.co_name == "generate" and "generation" in code.co_filename and "streamer" in frame.f_locals:
            return frame.f_locals["streamer"]
        frame = frame.f_back
    return None


def _check_options(generation_config, logits_processor, assistant_model) -> None:
    for name, default, what in _REFUSED_FLAGS:
        value = getattr(generation_config, name, default)
        if value not in (default, None) and not (default is False and not value):
            raise ConfigError(f"clasp_generate cannot honour {name}={value!r} ({what}); leave it unset.")
    for processor in logits_processor or []:
        kind = type(processor).__name__
        if kind not in _HONOURED_PROCESSORS:
            raise ConfigError(
                f"clasp_generate cannot honour {kind} (set by an option such as repetition_penalty, "
                "no_repeat_ngram_size, bad_words_ids, min_p or a logits_processor argument, possibly from the "
                "model's generation_config.json); unset that option to use CLaSp."
            )
    if assistant_model is not None:
        raise ConfigError("clasp_generate drafts with the model itself; do not pass assistant_model.")


def _config(generation_config, input_len: int, clasp_options: dict[str, Any]) -> GenerationConfig:
    gc = generation_config
    max_new = (gc.max_length or input_len + 20) - input_len
    if max_new < 1:
        raise ConfigError(f"max_length={gc.max_length} leaves no room after the {input_len}-token input.")
    fields: dict[str, Any] = {
        "max_new_tokens": max_new,
        "min_new_tokens": min(max_new, max(0, (gc.min_length or 0) - input_len)),
    }
    if gc.do_sample:
        fields.update(
            temperature=float(gc.temperature if gc.temperature is not None else 1.0),
            top_k=int(gc.top_k or 0),
            top_p=float(gc.top_p if gc.top_p is not None else 1.0),
            seed=int(torch.randint(0, 2**63 - 1, ()).item()),  # from torch's global generator: set_seed reproduces
        )
    clasp_options = {("method" if k == "clasp_method" else k): v for k, v in clasp_options.items()}
    try:
        return GenerationConfig(**fields).updated(**clasp_options)
    except ConfigError as e:
        raise ConfigError(f"clasp_generate: {e}") from None


def _eos_ids(generation_config) -> frozenset[int]:
    eos = generation_config.eos_token_id
    if eos is None:
        return frozenset()
    return frozenset([int(eos)] if isinstance(eos, int) else [int(e) for e in eos])


def _stopper(criteria, pads: list[int]):
    """A :data:`~.decoding.Stopper` over the stopping criteria this adapter does not handle itself (stop
    strings, time limits, your own): each is asked after every token of a round, on the sequence up to
    that token (with the input's padding in front, as ``generate`` would show it)."""
    others = [c for c in criteria or [] if type(c).__name__ not in _HANDLED_CRITERIA]
    if not others:
        return None

    def stop(tokens: list[int], new: int) -> int | None:
        base = len(tokens) - new
        for j in range(1, new + 1):
            ids = torch.tensor([pads + tokens[: base + j]], dtype=torch.long)
            if any(bool(c(ids, None).any()) for c in others):
                return j
        return None

    return stop


def clasp_generate(
    model,
    input_ids: torch.LongTensor,
    logits_processor=None,
    stopping_criteria=None,
    generation_config=None,
    synced_gpus: bool = False,
    streamer=None,
    clasp_method: str = "hybrid",
    skip_ratio: float | None = None,
    num_skip: int | None = None,
    skip_layers=None,
    draft_exit_threshold: float | None = None,
    max_draft_tokens: int | None = None,
    layer_opt_interval: int | None = None,
    draft_vocab: int | None = None,
    draft_quant: str | None = None,
    lookup_max_tokens: int | None = None,
    adaptive: bool | None = None,
    assistant_model=None,
    **model_kwargs,
):
    """Use as ``model.generate(**inputs, custom_generate=clasp_generate, clasp_method="clasp", ...)``.

    Returns what ``generate`` returns: the prompt and the new tokens as a ``LongTensor`` ``[1, n]`` (or a
    ``GenerateDecoderOnlyOutput`` with ``sequences`` when ``return_dict_in_generate``)."""
    from transformers.generation.utils import GenerateDecoderOnlyOutput

    _check_options(generation_config, logits_processor, assistant_model)
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ConfigError(f"clasp_generate decodes one sequence at a time; got a batch of {input_ids.shape[0]}.")
    options = {
        k: v
        for k, v in dict(
            clasp_method=clasp_method,
            skip_ratio=skip_ratio,
            num_skip=num_skip,
            skip_layers=skip_layers,
            draft_exit_threshold=draft_exit_threshold,
            max_draft_tokens=max_draft_tokens,
            layer_opt_interval=layer_opt_interval,
            draft_vocab=draft_vocab,
            draft_quant=draft_quant,
            lookup_max_tokens=lookup_max_tokens,
            adaptive=adaptive,
        ).items()
        if v is not None
    }
    cfg = _config(generation_config, input_ids.shape[1], options)
    mask = model_kwargs.get("attention_mask")
    row = input_ids[0]
    prompt = row[mask[0].bool()] if mask is not None else row
    state = model_state(model)
    gen = Generation(
        state.runner,
        prompt.tolist(),
        cfg,
        make_drafter(cfg),
        model=state,
        eos_ids=_eos_ids(generation_config),
        stopper=_stopper(stopping_criteria, row[: len(row) - len(prompt)].tolist()),
    )
    streamer = streamer or _streamer_of_caller()
    for chunk in gen:
        if streamer is not None and chunk.token_ids:
            streamer.put(torch.tensor(chunk.token_ids))
    if streamer is not None:
        streamer.end()
    new = torch.tensor(gen.result().token_ids, dtype=torch.long, device=input_ids.device)
    sequences = torch.cat([row, new])[None]
    if generation_config.return_dict_in_generate:
        return GenerateDecoderOnlyOutput(sequences=sequences)
    return sequences
