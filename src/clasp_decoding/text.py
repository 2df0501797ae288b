"""Text around the token loop: prompts and chat templates, incremental detokenization, stop strings."""

from __future__ import annotations

from collections.abc import Sequence

from .errors import InputError

Prompt = str | Sequence[dict] | Sequence[int]


def encode_prompt(tokenizer, prompt: Prompt, *, raw: bool = False, limit: int | None = None) -> list[int]:
    """Token ids for a prompt: a string (wrapped in the chat template when the tokenizer has one and
    ``raw`` is false), a list of chat messages, or token ids as they are.

    With ``limit``, at most ``limit + 1`` ids are returned: enough to tell that a prompt is too long
    without turning a huge one into a huge Python list (the server's guard against large bodies)."""
    cut = {"truncation": True, "max_length": limit + 1} if limit is not None else {}
    if isinstance(prompt, str):
        if not prompt.strip():
            raise InputError("The prompt is empty.")
        if raw or not getattr(tokenizer, "chat_template", None):
            return list(tokenizer(prompt, add_special_tokens=True, **cut)["input_ids"])
        return _apply_chat(tokenizer, [{"role": "user", "content": prompt}], cut)
    prompt = list(prompt)
    if not prompt:
        raise InputError("The prompt is empty.")
    if all(isinstance(m, dict) for m in prompt):
        for i, m in enumerate(prompt):
            if "role" not in m or "content" not in m:
                raise InputError(f"Message {i} needs 'role' and 'content'.")
        if not getattr(tokenizer, "chat_template", None):
            # A base model: join the turns as plain text rather than refusing.
            return list(tokenizer("\n\n".join(str(m["content"]) for m in prompt), **cut)["input_ids"])
        return _apply_chat(tokenizer, prompt, cut)
    if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return list(prompt) if limit is None else list(prompt[: limit + 1])
    raise InputError("A prompt is a string, a list of {'role', 'content'} messages, or a list of token ids.")


def _apply_chat(tokenizer, messages: list[dict], cut: dict | None = None) -> list[int]:
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, **(cut or {}))
    if hasattr(out, "keys"):
        out = out["input_ids"]
    return list(out)


class IncrementalDecoder:
    """Turns a growing list of token ids into text pieces that are always whole UTF-8 characters, and
    finds stop strings.

    A character split across tokens decodes to U+FFFD until its last byte arrives (one U+FFFD per byte
    with byte-fallback tokenizers, so the text can *shrink* when the character completes); such a tail
    is held back, and so is a tail that could be the start of a stop string.

    Stop decisions depend on the token sequence alone, never on how tokens were grouped into rounds:
    after each token (in order) the text of every token so far is searched for a stop string, from the
    last point that an earlier token's text had made final (before its trailing U+FFFD run, less the
    stop string's length). Generation stops at the first token whose text contains a stop string, as
    ``transformers``' ``stop_strings`` does; the text is cut before the stop string, which is never
    shown, and the token ids keep the completing token. Only the generated text is searched (a stop
    string that would begin inside the prompt does not count), as in OpenAI's API.
    """

    def __init__(self, tokenizer, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0
        self.final = 0  # text before this index is final: no later token changes it
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, new_ids: Sequence[int]) -> tuple[str, int | None]:
        """Add tokens; return ``(new text piece, index into new_ids after which a stop string completed)``.

        With a stop string found, the text is cut before it and ``stopped`` is set; the caller keeps the
        token ids up to and including the completing token.
        """
        cut_at = None
        for i, t in enumerate(new_ids):
            self.ids.append(t)
            if not self.stop:
                continue
            text = self._decode(self.ids)  # the text of the tokens so far, this token included
            hit = _find_stop(text, self.stop, self.final)
            if hit is not None:
                self.text = text[:hit]
                self.stopped = True
                cut_at = i
                break
            self.final = _final_length(text)
        if not self.stopped:
            self.text = self._decode(self.ids)
        stable = _final_length(self.text[self.emitted :]) + self.emitted
        if not self.stopped:
            stable -= _partial_stop(self.text[:stable], self.stop)
        else:
            stable = len(self.text)
        piece = self.text[self.emitted : stable]
        self.emitted = stable
        return piece, cut_at

    def flush(self) -> str:
        """Whatever was held back (a trailing incomplete character at the very end)."""
        piece = self.text[self.emitted :]
        self.emitted = len(self.text)
        return piece


def _final_length(text: str) -> int:
    """Length of ``text`` without its trailing U+FFFD run (bytes of a character still incomplete)."""
    end = len(text)
    while end > 0 and text[end - 1] == "\ufffd":
        end -= 1
    return end


def _partial_stop(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


def _find_stop(text: str, stops: tuple[str, ...], final: int) -> int | None:
    """Earliest start of a stop string in ``text`` that ends beyond ``final`` characters (any occurrence
    ending before was in final text already, and searched then)."""
    best = None
    for s in stops:
        i = text.find(s, max(0, final - len(s) + 1))
        if i >= 0 and (best is None or i < best):
            best = i
    return best
