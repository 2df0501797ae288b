"""clasp-decoding: lossless layer-skip self-speculative decoding (CLaSp) for Hugging Face causal LMs."""

from .api import generate, generation, stream
from .config import GenerationConfig
from .context import NumericsNotice, restore
from .decoding import Generation, GenerationResult
from .drafting.registry import METHODS
from .errors import ClaspError, ConfigError, InputError, ModelLoadError, RunnerBusyError, UnsupportedModelError
from .fetch import BUILTIN_MODELS, DEFAULT_MODEL
from .models import load
from .stats import GenerationStats
from .suffix_index import SuffixIndex

__version__ = "0.3.0"

__all__ = [
    "BUILTIN_MODELS",
    "DEFAULT_MODEL",
    "METHODS",
    "ClaspError",
    "ConfigError",
    "Generation",
    "GenerationConfig",
    "GenerationResult",
    "GenerationStats",
    "InputError",
    "ModelLoadError",
    "NumericsNotice",
    "RunnerBusyError",
    "SuffixIndex",
    "UnsupportedModelError",
    "generate",
    "generation",
    "load",
    "restore",
    "stream",
]
