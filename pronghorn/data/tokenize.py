"""Rows -> ``input_ids`` + ``labels`` (``-100`` where no loss is taken), as TRL's SFTTrainer builds them.

- ``text``: every token is trained; EOS is appended unless the tokenizer already ends with it.
- ``raw_text``: as ``text`` (the tokenizer's own special tokens, BOS where it adds one, then EOS), but never
  fitted to ``max_length``: documents are cut into blocks later (:mod:`pronghorn.data.raw_text`).
- ``prompt_completion`` (strings): ``prompt + completion`` is tokenized once; tokens of the completion and
  the appended EOS are trained.
- chat rows (``messages``, and conversational ``prompt_completion``) are rendered with the tokenizer's chat
  template. The trained part of each assistant message is located by *character offsets*: the template is
  rendered for the prefix ``messages[:i]`` with the generation prompt (where the reply starts) and for
  ``messages[:i + 1]`` (where the turn ends), both checked to be prefixes of the full rendering, and the span
  is mapped to tokens with the fast tokenizer's offset mapping. The span is trained up to and including its
  last special token (the end-of-turn marker such as ``<|im_end|>`` or ``<|eot_id|>``), so the model learns
  to stop while the template's trailing newline stays masked. No response-template token search is used.
  Every message's text must appear in the rendering, in order (a template that drops one is an error).

Rows are rendered one by one and encoded a batch at a time (one call to the fast tokenizer's Rust backend).
Rows longer than ``max_length`` are truncated (keeping the start or the end), split, dropped or refused
(:mod:`pronghorn.data.truncation`); bad rows raise one :class:`DataError` naming each, or are skipped and
counted with ``skip_bad_rows=True``. :mod:`pronghorn.data.prepare` adds worker processes and a disk cache.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import jinja2
import numpy as np

from ..errors import DataError, spell
from ..kernels import IGNORE_INDEX
from .chat_templates import special_token_ids
from .formats import MESSAGES, PROMPT_COMPLETION, RAW_TEXT, TEXT, Example, check_format_name, detect_format, validate_record
from .oasst import OASST, oasst_conversations
from .pretokenized import TOKENIZED, pretokenized_labels
from .records import Record, as_record
from .truncation import check_fit_options, fit_to_length

__all__ = ["TRAIN_ON", "tokenize_record", "tokenize_dataset", "tokenize_batch", "prepare_records"]

TRAIN_ON = ("all_assistant", "last_assistant")
DEFAULT_MAX_LENGTH = 1024  # TRL's SFTConfig.max_length default
BATCH_SIZE = 256  # rows rendered, then encoded in one call to the fast tokenizer
_MAX_REPORTED_ERRORS = 10
logger = logging.getLogger("pronghorn.data")


@dataclass
class _Plan:
    """A validated row, ready to encode: the text, whether the tokenizer adds its special tokens, the
    character spans to train and how the row ends (``kind``: text | prompt_completion | chat)."""

    ex: Example
    kind: str
    text: str = ""
    spans: tuple[tuple[int, int], ...] = ()
    ids: list[int] | None = None  # pre-tokenized rows: already ids + labels
    labels: list[int] | None = None


def tokenize_record(
    row: Record | Mapping[str, Any],
    tokenizer: Any,
    fmt: str | None = None,
    max_length: int | None = DEFAULT_MAX_LENGTH,
    *,
    train_on: str = "all_assistant",
    chat_template: str | None = None,
    truncation_mode: str = "keep_start",
) -> dict[str, list[int]]:
    """Tokenize one row into ``{"input_ids": [...], "labels": [...]}``.

    ``fmt`` overrides format detection. ``max_length`` truncates (None: no truncation), keeping the start or,
    with ``truncation_mode="keep_end"``, the end. ``train_on`` (chat rows): ``"all_assistant"`` trains every
    assistant turn, ``"last_assistant"`` only the last one. ``chat_template`` overrides the tokenizer's
    template. Raises :class:`DataError` naming the file, row and field for an invalid row or a row left with
    no trained token.
    """
    check_tokenize_options(train_on, max_length, truncation_mode, "truncate")
    (out,) = tokenize_batch([as_record(row)], tokenizer, fmt, max_length, train_on=train_on,
                            chat_template=chat_template, truncation_mode=truncation_mode)
    if isinstance(out, DataError):
        raise out
    return out[0][0]


def tokenize_batch(
    records: Sequence[Record],
    tokenizer: Any,
    fmt: str | None,
    max_length: int | None,
    *,
    train_on: str = "all_assistant",
    chat_template: str | None = None,
    truncation_mode: str = "keep_start",
    overlong: str = "truncate",
) -> list[tuple[list[dict[str, list[int]]], str | None] | DataError]:
    """Tokenize a batch of records with one call to the fast tokenizer. Per record: ``(examples, outcome)`` as
    :func:`~pronghorn.data.truncation.fit_to_length` returns it, or the :class:`DataError` of a bad row."""
    results: list[Any] = [None] * len(records)
    specials = special_token_ids(tokenizer)
    plans: list[tuple[int, _Plan]] = []
    for i, rec in enumerate(records):
        try:
            plans.append((i, _plan(rec, tokenizer, fmt, train_on, chat_template)))
        except DataError as e:
            results[i] = e
    for add_special in (True, False):
        group = [(i, p) for i, p in plans if p.ids is None and (p.kind != "chat") == add_special]
        if not group:
            continue
        encoded = _encode_batch(tokenizer, [p.text for _, p in group], add_special)
        for (i, p), (ids, offsets) in zip(group, encoded):
            p.ids, p.labels = _labels(p, ids, offsets, tokenizer, specials)
    for i, p in plans:
        limit = None if p.ex.fmt == RAW_TEXT else max_length  # a document is cut into blocks, not truncated
        try:
            results[i] = fit_to_length(p.ex.record, p.ex.field, p.ids, p.labels, limit, truncation_mode, overlong)
        except DataError as e:
            results[i] = e
    return results


def prepare_records(records: Sequence[Record | Mapping[str, Any]], fmt: str | None,
                    oasst_best_only: bool = True) -> tuple[list[Record], str]:
    """Records and the dataset's format (detected from the first row unless given); OpenAssistant trees are
    expanded into their conversations."""
    records = [as_record(r, "<memory>", i) for i, r in enumerate(records)]
    if not records:
        raise DataError("the dataset is empty (no rows)")
    fmt = detect_format(records[0]) if fmt is None else check_format_name(fmt)
    if fmt == OASST:
        records, fmt = oasst_conversations(records, best_only=oasst_best_only, source=records[0].source), MESSAGES
    return records, fmt


def tokenize_dataset(
    records: Sequence[Record | Mapping[str, Any]],
    tokenizer: Any,
    fmt: str | None = None,
    max_length: int | None = DEFAULT_MAX_LENGTH,
    *,
    train_on: str = "all_assistant",
    chat_template: str | None = None,
    progress: bool = True,
    oasst_best_only: bool = True,
    truncation_mode: str = "keep_start",
    overlong: str = "truncate",
    skip_bad_rows: bool = False,
    return_stats: bool = False,
):
    """Tokenize every record (see :func:`tokenize_record`); the format is detected from the first record.

    OpenAssistant tree rows are first expanded into their root-to-leaf conversations (see
    :func:`~pronghorn.data.oasst.oasst_conversations`; ``oasst_best_only`` picks top-ranked replies only).
    ``overlong`` says what happens to a row longer than ``max_length`` (``"truncate"`` as
    ``truncation_mode`` says, ``"split"``, ``"drop"`` or ``"error"``; see :mod:`pronghorn.data.truncation`).
    Bad rows are collected (up to 10) and reported together in one :class:`DataError`; with
    ``skip_bad_rows=True`` they are left out instead, counted and logged (a warning on the
    ``pronghorn.data`` logger naming the first ones). With ``return_stats`` the result is
    ``(examples, stats)``: ``rows``, ``examples``, ``skipped``, ``truncated``, ``split``, ``dropped`` and
    ``bad_rows`` (the first 10 skipped rows' errors).
    """
    check_tokenize_options(train_on, max_length, truncation_mode, overlong)
    records, fmt = prepare_records(records, fmt, oasst_best_only)
    examples, stats = [], new_stats(len(records))
    batches = (records[s:s + BATCH_SIZE] for s in range(0, len(records), BATCH_SIZE))
    for batch in progress_batches(batches, len(records), f"Tokenizing {fmt} rows", progress):
        results = tokenize_batch(batch, tokenizer, fmt, max_length, train_on=train_on, chat_template=chat_template,
                                 truncation_mode=truncation_mode, overlong=overlong)
        add_results(results, examples, stats)
        if not skip_bad_rows and len(stats["bad_rows"]) >= _MAX_REPORTED_ERRORS:
            stats["stopped_early"] = True
            break
    return finish(examples, stats, skip_bad_rows, return_stats)


def new_stats(rows: int) -> dict[str, Any]:
    return {"rows": rows, "examples": 0, "skipped": 0, "truncated": 0, "split": 0, "dropped": 0, "bad_rows": []}


def add_results(results: Iterable, examples: list, stats: dict[str, Any]) -> None:
    """Fold :func:`tokenize_batch` results into ``examples`` and the counts of ``stats``."""
    for res in results:
        if isinstance(res, DataError):
            stats["skipped"] += 1
            if len(stats["bad_rows"]) < _MAX_REPORTED_ERRORS:
                stats["bad_rows"].append(str(res))
            continue
        exs, outcome = res
        if outcome is not None:
            stats[outcome] += 1
        examples.extend(exs)
    stats["examples"] = len(examples)


def finish(examples: list, stats: dict[str, Any], skip_bad_rows: bool, return_stats: bool):
    """Raise for bad rows (unless skipping them), log what was skipped / truncated / split / dropped."""
    errors = stats["bad_rows"]
    if errors and not skip_bad_rows:
        if len(errors) == 1:
            raise DataError(errors[0])
        count = f"at least {stats['skipped']}" if stats.get("stopped_early") else str(stats["skipped"])
        shown = f" (the first {len(errors)} shown)" if stats["skipped"] > len(errors) else ""
        raise DataError(f"{count} bad rows{shown}:\n  " + "\n  ".join(errors)
                        + f"\n(pass {spell('skip_bad_rows', True)} to leave bad rows out instead)")
    if stats["skipped"]:
        logger.warning("skipped %d bad row(s) of %d (skip_bad_rows / --skip-bad-rows); the first:\n  %s",
                       stats["skipped"], stats["rows"], "\n  ".join(errors))
    changed = {k: stats[k] for k in ("truncated", "split", "dropped") if stats[k]}
    if changed:
        logger.warning("rows longer than max_length: %s", ", ".join(f"{v} {k}" for k, v in changed.items()))
    if not examples:
        raise DataError(f"no usable row: all {stats['rows']} rows were skipped or dropped"
                        + (f"; the first error: {errors[0]}" if errors else ""))
    return (examples, stats) if return_stats else examples


def check_tokenize_options(train_on: str, max_length: int | None, truncation_mode: str, overlong: str) -> None:
    """Raise ``ValueError`` for an unknown ``train_on`` or a bad length / truncation / overlong setting."""
    if train_on not in TRAIN_ON:
        raise ValueError(f"train_on must be one of {', '.join(TRAIN_ON)}, got {train_on!r}")
    check_fit_options(max_length, truncation_mode, overlong)


# -- per-format planning: validate, render, locate the trained character spans -----------------------------


def _plan(rec: Record, tokenizer: Any, fmt: str | None, train_on: str, chat_template: str | None) -> _Plan:
    ex = validate_record(rec, fmt)
    if ex.fmt == TOKENIZED:
        ids, labels = pretokenized_labels(ex, tokenizer)
        return _Plan(ex, "tokenized", ids=ids, labels=labels)
    if ex.fmt in (TEXT, RAW_TEXT):
        return _Plan(ex, "text", ex.text)
    if ex.fmt == PROMPT_COMPLETION and not ex.conversational:
        full = ex.prompt + ex.completion
        return _Plan(ex, "prompt_completion", full, ((len(ex.prompt), len(full)),))
    if ex.messages is not None:
        messages, first = ex.messages, 0
    else:  # conversational prompt-completion: train the completion's assistant messages only
        messages, first = ex.prompt + ex.completion, len(ex.prompt)
    trained = [i for i in range(first, len(messages)) if messages[i]["role"] == "assistant"]
    if train_on == "last_assistant":
        trained = trained[-1:]
    full, spans = _render_chat(ex, messages, trained, tokenizer, chat_template)
    return _Plan(ex, "chat", full, tuple(spans))


def _render_chat(
    ex: Example, messages: list[dict], trained: list[int], tokenizer: Any, chat_template: str | None
) -> tuple[str, list[tuple[int, int]]]:
    rec = ex.record
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "the tokenizer has no chat template; pass chat_template= (a Jinja template) to render chat rows"
        )

    def render(msgs: list[dict], generation_prompt: bool) -> str:
        extra = {"tools": ex.tools} if ex.tools else {}
        try:
            return tokenizer.apply_chat_template(
                msgs, chat_template=chat_template, add_generation_prompt=generation_prompt, tokenize=False, **extra
            )
        except jinja2.TemplateError as e:
            raise rec.error(ex.field, f"the chat template failed to render this conversation: {e}") from None

    full = render(messages, False)
    closing = _closing_text(full, lambda: render(messages, True), getattr(tokenizer, "eos_token", None))
    spans = []
    for i in trained:
        start_text = render(messages[:i], True)
        end_text = full if i == len(messages) - 1 else render(messages[: i + 1], False)
        if closing and end_text.endswith(closing):
            end_text = end_text[: -len(closing)]
        for prefix, what in ((start_text, f"the first {i} messages with add_generation_prompt=True"),
                             (end_text, f"the first {i + 1} messages")):
            if not full.startswith(prefix):
                raise rec.error(
                    ex.message_field(i),
                    f"the chat template's rendering of {what} is not a prefix of the full conversation's "
                    "rendering (the template rewrites or drops earlier turns), so the assistant turns cannot be "
                    "located by character offsets; use a template that renders each turn independently",
                )
        if len(end_text) <= len(start_text):
            raise rec.error(ex.message_field(i), "the chat template renders this assistant message as nothing")
        for call in messages[i].get("tool_calls") or []:
            if call["function"]["name"] not in end_text[len(start_text):]:
                raise rec.error(
                    f"{ex.message_field(i)}.tool_calls",
                    f"the chat template does not render tool calls (the call to {call['function']['name']!r} "
                    "is missing from its rendering); use a chat template that supports tool calling",
                )
        spans.append((len(start_text), len(end_text)))
    _check_every_message_rendered(ex, messages, full)
    return full, spans


def _closing_text(full: str, with_prompt: Callable[[], str], eos: str | None) -> str:
    """What a template appends only at the very end of a conversation: the EOS that Phi-3 / 3.5 / 4-mini's
    templates write when no generation prompt follows (their turns end ``<|end|>``, the conversation
    ``<|end|>\\n<|endoftext|>``). It is found as the tokenizer's EOS that ends ``full`` while ``full`` without it is
    where the generation prompt would start; '' for the usual template (the prompt just follows ``full``).
    Every assistant turn's span ends before it, so each turn trains its content and end-of-turn marker only."""
    if not eos or not full.endswith(eos):
        return ""
    try:
        prompted = with_prompt()  # the conversation followed by a generation prompt
    except DataError:  # a template that refuses a prompt after an assistant turn: no closing text found
        return ""
    return eos if not prompted.startswith(full) and prompted.startswith(full[: -len(eos)]) else ""


def _check_every_message_rendered(ex: Example, messages: list[dict], full: str) -> None:
    """Each message's text must appear in the rendering, in order: a template that silently drops a message
    (a system prompt it ignores, tool results it does not support) would train on a different conversation."""
    pos = 0
    for j, msg in enumerate(messages):
        content = (msg.get("content") or "").strip()
        if not content:
            continue
        # some templates move the system prompt (Mistral's into the last user turn): look for it anywhere
        found = full.find(content) if msg["role"] == "system" else full.find(content, pos)
        if found < 0:
            what = ("does not render tool messages (this tool result is missing from the rendering); use a chat "
                    "template that supports the 'tool' role") if msg["role"] == "tool" else (
                   f"drops this {msg['role']!r} message (its text is missing from the rendering, or out of "
                   "order); use a chat template that renders every message")
            raise ex.record.error(ex.message_field(j), f"the chat template {what}")
        if msg["role"] != "system":
            pos = found + len(content)


# -- encoding and labels ----------------------------------------------------------------------------------


def _labels(p: _Plan, ids: list[int], offsets: list[tuple[int, int]], tokenizer: Any,
            specials: set[int]) -> tuple[list[int], list[int]]:
    if p.kind == "text":
        eos = _eos_id(tokenizer)
        if not ids or ids[-1] != eos:
            ids.append(eos)
        return ids, list(ids)
    off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    labels = [IGNORE_INDEX] * len(ids)
    for start, end in p.spans:
        toks = np.flatnonzero(_overlapping(off, start, end)).tolist()
        if p.kind == "chat":
            # each assistant span is trained up to and including its last special token (the end-of-turn
            # marker), so the model learns to stop while the template's trailing text stays masked
            last = next((k for k in range(len(toks) - 1, -1, -1) if ids[toks[k]] in specials), None)
            if last is not None:
                toks = toks[: last + 1]
        if toks and toks[-1] - toks[0] + 1 == len(toks):  # the usual case: one run of tokens
            labels[toks[0]:toks[-1] + 1] = ids[toks[0]:toks[-1] + 1]
        else:
            for t in toks:
                labels[t] = ids[t]
    if p.kind == "prompt_completion":
        eos = _eos_id(tokenizer)
        if ids and ids[-1] == eos:  # the tokenizer appends EOS itself, or the completion ends with it
            labels[-1] = eos
        else:
            ids.append(eos)
            labels.append(eos)
    return ids, labels


# -- helpers ---------------------------------------------------------------------------------------------


def _encode_batch(tokenizer: Any, texts: list[str], add_special_tokens: bool) -> list[tuple[list[int], list]]:
    """``(ids, offsets)`` per text, from one batched call to the fast tokenizer's Rust backend (or its Python
    wrapper when the backend has truncation/padding configured)."""
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(
            f"{type(tokenizer).__name__} is not a fast tokenizer; computing label masks needs "
            "return_offsets_mapping (load it with use_fast=True)"
        )
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and backend.truncation is None and backend.padding is None:
        return [(enc.ids, enc.offsets) for enc in backend.encode_batch(texts, add_special_tokens=add_special_tokens)]
    enc = tokenizer(texts, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    return [(list(i), [tuple(o) for o in off]) for i, off in zip(enc["input_ids"], enc["offset_mapping"])]


def _overlapping(off: np.ndarray, start: int, end: int) -> np.ndarray:
    """Which tokens (rows of ``(begin, end)`` character offsets) overlap ``[start, end)``; a zero-width token
    (e.g. one a post-processor added) is inside when it sits in the span."""
    a, b = off[:, 0], off[:, 1]
    return np.where(a == b, (start <= a) & (a < end), (a < end) & (b > start))



def _eos_id(tokenizer: Any) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ValueError("the tokenizer has no eos_token; set tokenizer.eos_token so rows can end with it")
    return eos


def progress_batches(batches: Iterable[Sequence], total: int, description: str, enabled: bool) -> Iterator[Sequence]:
    """Yield ``batches``, advancing a progress bar by each batch's length (rows) when ``enabled``."""
    if not enabled:
        yield from batches
        return
    from rich.progress import Progress

    with Progress(transient=True) as bar:
        task = bar.add_task(description, total=total)
        for batch in batches:
            yield batch
            bar.advance(task, len(batch))
