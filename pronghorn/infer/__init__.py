"""Text generation: KV-cached decoding, sampling (transformers' semantics) and streaming."""

from .generate import generate
from .streaming import TerminalStreamer

__all__ = ["TerminalStreamer", "generate"]
