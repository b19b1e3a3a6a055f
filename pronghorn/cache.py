"""Where pronghorn keeps what it can rebuild (the converted default model, tokenized datasets): one root."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_root"]


def cache_root() -> Path:
    """``$PRONGHORN_CACHE``, else ``$XDG_CACHE_HOME/pronghorn``, else ``~/.cache/pronghorn``."""
    if os.environ.get("PRONGHORN_CACHE"):
        return Path(os.environ["PRONGHORN_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "pronghorn"
    return Path.home() / ".cache" / "pronghorn"
