"""Where the package keeps what it makes once and reuses: built-in models, compiled kernels, search results."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$CLASP_CACHE_DIR``, or ``~/.cache/clasp-decoding``."""
    return Path(os.environ.get("CLASP_CACHE_DIR", Path.home() / ".cache" / "clasp-decoding")).expanduser()
