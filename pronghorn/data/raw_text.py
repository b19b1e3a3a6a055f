"""Raw text for continued pretraining: documents -> token ids -> blocks of ``max_length`` tokens, kept apart.

As Hugging Face's ``group_texts`` (``run_clm.py``) and Unsloth's text-completion notebook do, every document is
tokenized with the tokenizer's own special tokens (so a BOS where the tokenizer adds one), EOS is appended, and
the documents are concatenated in order and cut into blocks of exactly ``max_length`` tokens (the last block may
be shorter; it is kept). Unlike ``group_texts``, a block is a padding-free packed row
(:func:`~pronghorn.data.packing.pack_examples`, strategy ``"chunk"``): its position ids restart at 0 where each
document starts, so the model's document mask keeps the block's documents from attending to each other, and a
document's first token is not a target (it would be predicted from the previous document). A document cut at a
block end continues in the next block as a new sequence (positions from 0, its first token there not a target,
as in ``group_texts``, where a block starts without context too).

Rows are ``{"text": str}`` (format ``"raw_text"``, :mod:`pronghorn.data.formats`): from ``.jsonl`` / ``.json``
files, ``.txt`` files (a document per line, per paragraph or per file: ``sample_by``), folders or glob patterns
of them, or plain strings.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

from .formats import RAW_TEXT
from .packing import pack_examples
from .records import Record, load_records, records_from_rows
from .tokenize import tokenize_dataset

__all__ = ["RAW_TEXT", "chunk_documents", "raw_text_blocks"]


def chunk_documents(documents: Sequence[Mapping[str, Any]], max_length: int, return_stats: bool = False):
    """Tokenized documents (``{"input_ids", "labels"}``, in order) as blocks of ``max_length`` tokens:
    ``{"input_ids", "labels", "position_ids"}`` rows, every token of every document exactly once."""
    return pack_examples(documents, max_length, strategy="chunk", return_stats=return_stats)


def raw_text_blocks(
    data: str | os.PathLike | Sequence[str | Mapping[str, Any] | Record],
    tokenizer: Any,
    max_length: int,
    *,
    sample_by: str = "line",
    skip_bad_rows: bool = False,
    progress: bool = True,
    return_stats: bool = False,
):
    """Blocks of ``max_length`` tokens (see the module doc) from ``data``: a file, folder or glob pattern
    (``sample_by`` cuts ``.txt`` files: ``"line"``, ``"paragraph"`` or ``"document"``), or a list of documents
    (strings, ``{"text": ...}`` rows or Records). A bad row (no ``text`` field, not a string, empty) raises a
    :class:`~pronghorn.errors.DataError` naming its file, row and field, or is skipped with ``skip_bad_rows``.
    With ``return_stats``: ``(blocks, stats)``, stats counting documents, blocks and tokens."""
    if isinstance(data, (str, os.PathLike)):
        records = load_records(data, sample_by=sample_by)
    else:
        records = records_from_rows([{"text": d} if isinstance(d, str) else d for d in data])
    docs, stats = tokenize_dataset(records, tokenizer, RAW_TEXT, None, progress=progress,
                                   skip_bad_rows=skip_bad_rows, return_stats=True)
    blocks, chunking = chunk_documents(docs, max_length, return_stats=True)
    stats.update(documents=len(docs), blocks=chunking["rows"], tokens=chunking["tokens"], fill=chunking["fill"])
    return (blocks, stats) if return_stats else blocks
