"""clasp-decoding: lossless layer-skip self-speculative decoding (CLaSp) for Hugging Face causal LMs."""

from .api import GenerationResult, generate, stream
from .config import METHODS, GenerationConfig
from .errors import ClaspError, ConfigError, InputError, ModelLoadError, UnsupportedModelError
from .models import BUILTIN_MODELS, DEFAULT_MODEL, load
from .stats import GenerationStats

__version__ = "0.1.0"

__all__ = [
    "BUILTIN_MODELS",
    "DEFAULT_MODEL",
    "METHODS",
    "ClaspError",
    "ConfigError",
    "GenerationConfig",
    "GenerationResult",
    "GenerationStats",
    "InputError",
    "ModelLoadError",
    "UnsupportedModelError",
    "generate",
    "load",
    "stream",
]
