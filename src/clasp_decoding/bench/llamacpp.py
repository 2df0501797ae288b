"""The CPU peer users pick: llama.cpp (through ``llama-cpp-python``), run on the very weights the engine
runs, in bf16, greedy, on the same prompt token ids, timed the same way (first call to last token).

The built-in models come from GGUF files (Q8_0 and the like); llama.cpp's own ``llama_model_quantize``
rewrites such a file in bf16 (``allow_requantize``), which is what the engine computes with after its
own conversion. Optional: ``pip install -e .[peers]`` builds llama.cpp from source (about 5 minutes on
2 cores); without it the benchmark skips this method and says so.
"""

from __future__ import annotations

import ctypes
import time
from pathlib import Path

from ..errors import ModelLoadError
from ..fetch import BUILTIN_MODELS, fetch_gguf
from ..paths import cache_dir

INSTALL_HINT = "pip install -e '.[peers]' (builds llama-cpp-python from source, about 5 minutes on 2 cores)"


def available() -> str | None:
    """``None`` when llama-cpp-python imports, else why not (with how to install it)."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError as e:
        return f"llama-cpp-python is not installed ({e}); {INSTALL_HINT}"
    return None


def bf16_gguf(model: str) -> Path:
    """A bf16 GGUF of ``model`` (a built-in name or a ``.gguf`` file), rewritten once by llama.cpp."""
    import llama_cpp

    if model in BUILTIN_MODELS:
        source = fetch_gguf(model, quiet=True)
        stem = model
    elif model.endswith(".gguf") and Path(model).is_file():
        source, stem = Path(model), Path(model).stem
    else:
        raise ModelLoadError(f"llamacpp runs GGUF files: give a built-in model name or a .gguf file, not {model!r}.")
    dest = cache_dir() / "gguf" / f"{stem}-bf16.gguf"
    if not dest.is_file():
        dest.parent.mkdir(parents=True, exist_ok=True)
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_BF16
        params.allow_requantize = True
        tmp = dest.with_suffix(".part")
        code = llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), ctypes.byref(params))
        if code != 0:
            raise ModelLoadError(f"llama.cpp could not rewrite {source} in bf16 (code {code}).")
        tmp.replace(dest)
    return dest


class LlamaCpp:
    """One llama.cpp model, loaded once per benchmark run."""

    def __init__(self, model: str, threads: int, context: int = 8192) -> None:
        from llama_cpp import Llama

        self.path = bf16_gguf(model)
        self.llm = Llama(
            model_path=str(self.path), n_ctx=context, n_threads=threads, n_threads_batch=threads, verbose=False
        )

    def generate(self, prompt_ids: list[int], max_new_tokens: int, eos_ids) -> tuple[list[int], float]:
        """Greedy tokens after ``prompt_ids`` (no prefix reuse between calls) and the wall time."""
        eos = set(eos_ids) | {self.llm.token_eos()}
        out: list[int] = []
        t0 = time.perf_counter()
        self.llm.reset()
        for token in self.llm.generate(prompt_ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
            out.append(int(token))
            if token in eos or len(out) >= max_new_tokens:
                break
        return out, time.perf_counter() - t0
