"""Names to weights: built-in names, hub ids, local folders and GGUF files, loaded as a checked model."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .errors import ModelLoadError
from .fetch import BUILTIN_MODELS, DEFAULT_MODEL, fetch_builtin

__all__ = ["BUILTIN_MODELS", "DEFAULT_MODEL", "load", "resolve_dtype"]


def resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    """``"auto"`` picks bf16 on CUDA and, on the CPU, whichever of bf16 and fp32 runs a single-row matrix
    product (what plain decoding does per token) faster here, measured once per process (CPU flags
    mislead: without bf16 instructions bf16 rows can still be faster, being half the bytes)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if device.startswith("cuda"):
            return torch.bfloat16
        from .costs import fastest_cpu_dtype

        return fastest_cpu_dtype()
    table = {
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
        "fp16": torch.float16,
        "float16": torch.float16,
        "fp32": torch.float32,
        "float32": torch.float32,
    }
    if dtype not in table:
        raise ModelLoadError(f"Unknown dtype {dtype!r}; use one of auto, bf16, fp16, fp32.")
    return table[dtype]


def placement_device(device: str, device_map: str | dict | None) -> str:
    """The kind of device the model computes on: ``device``, or for a ``device_map`` ``cuda`` when it
    places anything on a GPU (``"auto"`` and friends do whenever one is present), else ``cpu``."""
    if device_map is None:
        return device
    if isinstance(device_map, str):
        return "cuda" if torch.cuda.is_available() and not device_map.startswith("cpu") else "cpu"
    values = [str(v) for v in device_map.values()]
    return "cuda" if any(v.isdigit() or v.startswith("cuda") for v in values) else "cpu"


def _hub_cached(repo_id: str) -> bool:
    """Whether the Hugging Face cache already holds ``repo_id``'s config (so no network is needed)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # an id the hub library rejects is simply not cached
        return False


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP check of the hub endpoint, so an unknown name fails in seconds, not after retries."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _source(name_or_path: str, quiet: bool) -> tuple[str, dict]:
    """Where ``from_pretrained`` should look, and the extra arguments (a GGUF file name) it needs."""
    if name_or_path in BUILTIN_MODELS:
        return str(fetch_builtin(name_or_path, quiet=quiet)), {}
    if name_or_path.endswith(".gguf"):
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {name_or_path!r} does not exist.")
        return str(path.parent), {"gguf_file": path.name}
    if Path(name_or_path).expanduser().exists():
        source = str(Path(name_or_path).expanduser())
        if not (Path(source) / "config.json").is_file():
            raise ModelLoadError(f"Folder {name_or_path!r} has no config.json, so it is not a model folder.")
        return source, {}
    if not _hub_cached(name_or_path) and not _hub_reachable():
        raise ModelLoadError(
            f"Unknown model {name_or_path!r}: it is not a built-in name ({', '.join(BUILTIN_MODELS)}), a local "
            f"folder or a .gguf file, and the Hugging Face Hub cannot be reached to fetch it."
        )
    return name_or_path, {}


def load(
    name_or_path: str = DEFAULT_MODEL,
    *,
    dtype: str | torch.dtype | None = "auto",
    device: str = "cpu",
    device_map: str | dict | None = None,
    quiet: bool = False,
):
    """Load ``(model, tokenizer)`` from a built-in name, a local folder, a ``.gguf`` file or a hub id.

    ``device_map`` (``"auto"`` or a dict of module name -> device, as ``accelerate`` takes it) spreads the
    layers over several devices, for models larger than one; ``device`` is then ignored. The model is
    checked to be drivable layer by layer, so that an unsupported architecture fails here with a clear
    message rather than in the middle of a generation.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from .families import check_supported

    torch_dtype = resolve_dtype(dtype, placement_device(device, device_map))
    source, kwargs = _source(name_or_path, quiet)
    gguf = bool(kwargs.get("gguf_file"))
    placement = {"device_map": device_map} if device_map is not None and not gguf else {}
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a one-second load needs no progress bar
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        load_dtype = torch.float32 if gguf else torch_dtype  # GGUF: dequantize, then cast
        model = AutoModelForCausalLM.from_pretrained(source, dtype=load_dtype, **kwargs, **placement)
    except (OSError, ValueError, KeyError) as e:
        known = ", ".join(BUILTIN_MODELS)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"Cannot load model {name_or_path!r}: {first} (built-in names: {known}).") from e
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    if gguf:
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model = model.to(torch_dtype)
    if not placement:
        model = model.to(device)
    model = model.eval()
    check_supported(model)
    return model, tokenizer
