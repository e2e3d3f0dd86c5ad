"""Where nucleus-export keeps generated checkpoints and TensorRT timing caches between runs."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "NUCLEUS_EXPORT_CACHE"


def cache_root() -> Path:
    """$NUCLEUS_EXPORT_CACHE, else ~/.cache/nucleus-export."""
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "nucleus-export"))
