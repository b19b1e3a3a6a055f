"""Tokenize a big dataset fast: batched, in several processes when that pays, cached on disk.

:func:`prepare_dataset` gives what :func:`~pronghorn.data.tokenize.tokenize_dataset` gives (same rows, same
errors) but

- splits the rows into chunks tokenized by a pool of worker processes (``num_proc``; by default only with at
  least ``MIN_CPUS_FOR_PROCESSES`` CPUs and ``MIN_ROWS_PER_PROCESS`` rows per process: starting workers and
  sending rows back costs time, and the fast tokenizer's batched encoding already runs on several threads),
- shows one progress bar over all rows,
- stores the result in ``cache_dir`` under a key hashed from the data (every row's content, file and
  position), the tokenizer (its full ``tokenizer.json``, chat template and special tokens) and the settings
  (format, max_length, train_on, truncation, ...), so a second run with the same three is a file read and a
  change to any of them tokenizes afresh. Cache files are written atomically (``<key>.npz``).
"""

from __future__ import annotations

import hashlib
from itertools import chain
import json
import multiprocessing
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..cache import cache_root
from ..files import atomic_file
from .records import Record
from .tokenize import (
    BATCH_SIZE,
    DEFAULT_MAX_LENGTH,
    add_results,
    check_tokenize_options,
    finish,
    new_stats,
    prepare_records,
    progress_batches,
    tokenize_batch,
)

__all__ = ["CACHE_VERSION", "MIN_ROWS_PER_PROCESS", "default_cache_dir", "prepare_dataset", "tokenizer_fingerprint"]

CACHE_VERSION = 1  # bump when tokenization output changes for the same inputs
MIN_ROWS_PER_PROCESS = 4096
MIN_CPUS_FOR_PROCESSES = 4  # on 2 cores, 2 processes measured slower than 1 (benchmarks/data.py)
_CHUNK = 4 * BATCH_SIZE


def default_cache_dir() -> Path:
    """``tokenized`` under the cache root (:func:`pronghorn.cache.cache_root`)."""
    return cache_root() / "tokenized"


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of everything about ``tokenizer`` that changes token ids or labels."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update((backend.to_str() if backend is not None else repr(getattr(tokenizer, "vocab_size", None))).encode())
    special = {k: str(v) for k, v in sorted((getattr(tokenizer, "special_tokens_map", None) or {}).items())}
    extra = [getattr(tokenizer, "chat_template", None), special, getattr(tokenizer, "eos_token_id", None),
             len(tokenizer) if hasattr(tokenizer, "__len__") else None]
    h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _data_fingerprint(records: Sequence[Record]) -> str:
    h = hashlib.sha256()
    for rec in records:
        h.update(json.dumps([rec.source, rec.index, rec.kind, rec.row], sort_keys=True, default=repr).encode())
        h.update(b"\n")
    return h.hexdigest()


def prepare_dataset(
    records: Sequence[Record | Mapping[str, Any]],
    tokenizer: Any,
    fmt: str | None = None,
    max_length: int | None = DEFAULT_MAX_LENGTH,
    *,
    train_on: str = "all_assistant",
    chat_template: str | None = None,
    truncation_mode: str = "keep_start",
    overlong: str = "truncate",
    skip_bad_rows: bool = False,
    oasst_best_only: bool = True,
    num_proc: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    cache: bool = True,
    progress: bool = True,
    return_stats: bool = False,
):
    """Tokenize ``records`` like :func:`~pronghorn.data.tokenize.tokenize_dataset` (same arguments), with a
    disk cache and worker processes.

    ``num_proc``: worker processes (None: one process below ``MIN_CPUS_FOR_PROCESSES`` CPUs, else
    ``os.cpu_count()`` capped so each has at least ``MIN_ROWS_PER_PROCESS`` rows; 1: in this process). ``cache_dir``: where results are kept (None:
    :func:`default_cache_dir`); ``cache=False`` neither reads nor writes it. With ``return_stats`` the result is
    ``(examples, stats)``; ``stats["cache"]`` is ``"hit"``, ``"miss"`` or ``"off"``, ``stats["cache_file"]``
    the file used and ``stats["processes"]`` how many processes tokenized it.
    """
    check_tokenize_options(train_on, max_length, truncation_mode, overlong)
    records, fmt = prepare_records(records, fmt, oasst_best_only)
    settings = dict(fmt=fmt, max_length=max_length, train_on=train_on, chat_template=chat_template,
                    truncation_mode=truncation_mode, overlong=overlong, version=CACHE_VERSION)
    path = None
    if cache:
        key = hashlib.sha256(json.dumps(
            [settings, tokenizer_fingerprint(tokenizer), _data_fingerprint(records)], sort_keys=True
        ).encode()).hexdigest()[:32]
        path = Path(cache_dir if cache_dir is not None else default_cache_dir()) / f"{key}.npz"
        if path.is_file():
            try:
                examples, stats = _read(path)
            except (OSError, ValueError, KeyError):
                pass  # unreadable or foreign file: tokenize again and replace it
            else:
                stats.update(cache="hit", cache_file=str(path))
                return finish(examples, stats, skip_bad_rows, return_stats)
    kwargs = dict(train_on=train_on, chat_template=chat_template, truncation_mode=truncation_mode,
                  overlong=overlong)
    processes = _processes(num_proc, len(records))
    examples, stats = _tokenize_all(records, tokenizer, fmt, max_length, kwargs, processes, progress)
    stats["processes"] = processes
    if path is not None and not stats["skipped"]:  # results with bad rows are not cached: the error must recur
        _write(path, examples, stats)
    stats.update(cache="miss" if path is not None else "off", cache_file=str(path) if path else None)
    return finish(examples, stats, skip_bad_rows, return_stats)


def _processes(num_proc: int | None, rows: int) -> int:
    if num_proc is not None:
        if isinstance(num_proc, bool) or not isinstance(num_proc, int) or num_proc < 1:
            raise ValueError(f"num_proc must be a positive int or None, got {num_proc!r}")
        return max(1, min(num_proc, rows))
    cpus = os.cpu_count() or 1
    if cpus < MIN_CPUS_FOR_PROCESSES:  # the tokenizer's Rust threads already use the few cores there are
        return 1
    return max(1, min(cpus, rows // MIN_ROWS_PER_PROCESS))


# -- workers ----------------------------------------------------------------------------------------------

_WORKER: dict[str, Any] = {}


def _init_worker(tokenizer: Any, fmt: str, max_length: int | None, kwargs: dict) -> None:
    _WORKER.update(tokenizer=tokenizer, fmt=fmt, max_length=max_length, kwargs=kwargs)


def _work(chunk: list[Record]) -> list:
    w = _WORKER
    return tokenize_batch(chunk, w["tokenizer"], w["fmt"], w["max_length"], **w["kwargs"])


def _tokenize_all(records, tokenizer, fmt, max_length, kwargs, processes, progress):
    examples, stats = [], new_stats(len(records))
    if processes == 1:
        chunks = (records[s:s + BATCH_SIZE] for s in range(0, len(records), BATCH_SIZE))
        for chunk in progress_batches(chunks, len(records), f"Tokenizing {fmt} rows", progress):
            add_results(tokenize_batch(chunk, tokenizer, fmt, max_length, **kwargs), examples, stats)
        return examples, stats
    size = max(1, min(_CHUNK, -(-len(records) // (4 * processes))))  # >= 4 chunks a worker, to balance them
    chunks = [records[s:s + size] for s in range(0, len(records), size)]
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one Rust thread per worker; no fork-after-threads warning
    try:
        with ctx.Pool(processes, initializer=_init_worker, initargs=(tokenizer, fmt, max_length, kwargs)) as pool:
            done = pool.imap(_work, chunks)
            what = f"Tokenizing {fmt} rows ({processes} processes)"
            for chunk in progress_batches(chunks, len(records), what, progress):
                add_results(next(done), examples, stats)
    finally:
        if saved is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved
    return examples, stats


# -- cache files ------------------------------------------------------------------------------------------


def _write(path: Path, examples: list[dict], stats: dict) -> None:
    lengths = np.fromiter((len(ex["input_ids"]) for ex in examples), dtype=np.int64, count=len(examples))
    total = int(lengths.sum())
    ids = np.fromiter(chain.from_iterable(ex["input_ids"] for ex in examples), dtype=np.int32, count=total)
    labels = np.fromiter(chain.from_iterable(ex["labels"] for ex in examples), dtype=np.int32, count=total)
    meta = json.dumps({k: v for k, v in stats.items() if k not in ("cache", "cache_file")})
    with atomic_file(path) as f:
        np.savez(f, lengths=lengths, input_ids=ids, labels=labels, stats=np.frombuffer(meta.encode(), np.uint8))


def _read(path: Path) -> tuple[list[dict], dict]:
    with np.load(path, allow_pickle=False) as z:
        lengths, ids, labels = z["lengths"], z["input_ids"].tolist(), z["labels"].tolist()
        stats = json.loads(z["stats"].tobytes().decode())
    bounds = np.concatenate([[0], np.cumsum(lengths)]).tolist()
    examples = [{"input_ids": ids[a:b], "labels": labels[a:b]} for a, b in zip(bounds, bounds[1:])]
    return examples, stats
