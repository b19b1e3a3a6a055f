"""How many rows of [rows, vocab] logits the chunked heads (fused linear + cross-entropy, linear log-probs)
materialise at once: a ~1 GiB buffer by default, split evenly so the last chunk is not a sliver."""

from __future__ import annotations

import math

CHUNK_BYTES = 1 << 30  # default logits chunk budget (rows x vocab x itemsize)


def chunk_rows(n: int, vocab: int, itemsize: int, chunk_size: int | None) -> int:
    """Rows per chunk for ``n`` rows: at most ``chunk_size`` (default: what fits CHUNK_BYTES), as even as can be."""
    cap = chunk_size if chunk_size else max(1, CHUNK_BYTES // (vocab * itemsize))
    chunks = max(1, math.ceil(n / cap))
    return max(1, math.ceil(n / chunks))
