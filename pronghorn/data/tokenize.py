"""Rows -> ``input_ids`` + ``labels`` (``-100`` where no loss is taken), as TRL's SFTTrainer builds them.

- ``text``: every token is trained; EOS is appended unless the tokenizer already ends with it.
- ``prompt_completion`` (strings): ``prompt + completion`` is tokenized once; tokens of the completion and
  the appended EOS are trained.
- chat rows (``messages``, and conversational ``prompt_completion``) are rendered with the tokenizer's chat
  template. The trained part of each assistant message is located by *character offsets*: the template is
  rendered for the prefix ``messages[:i]`` with the generation prompt (where the reply starts) and for
  ``messages[:i + 1]`` (where the turn ends), both checked to be prefixes of the full rendering, and the span
  is mapped to tokens with the fast tokenizer's offset mapping. The span is trained up to and including its
  last special token (the end-of-turn marker such as ``<|im_end|>`` or ``<|eot_id|>``), so the model learns
  to stop while the template's trailing newline stays masked. No response-template token search is used.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import jinja2

from ..errors import DataError
from .formats import MESSAGES, PROMPT_COMPLETION, TEXT, Example, check_format_name, detect_format, validate_record
from .oasst import OASST, oasst_conversations
from .pretokenized import TOKENIZED, pretokenized_labels
from .records import Record, as_record

__all__ = ["IGNORE_INDEX", "TRAIN_ON", "tokenize_record", "tokenize_dataset"]

IGNORE_INDEX = -100
TRAIN_ON = ("all_assistant", "last_assistant")
DEFAULT_MAX_LENGTH = 1024  # TRL's SFTConfig.max_length default
_MAX_REPORTED_ERRORS = 10


def tokenize_record(
    row: Record | Mapping[str, Any],
    tokenizer: Any,
    fmt: str | None = None,
    max_length: int | None = DEFAULT_MAX_LENGTH,
    *,
    train_on: str = "all_assistant",
    chat_template: str | None = None,
) -> dict[str, list[int]]:
    """Tokenize one row into ``{"input_ids": [...], "labels": [...]}``.

    ``fmt`` overrides format detection. ``max_length`` truncates keeping the start (None: no truncation).
    ``train_on`` (chat rows): ``"all_assistant"`` trains every assistant turn, ``"last_assistant"`` only the
    last one. ``chat_template`` overrides the tokenizer's template. Raises :class:`DataError` naming the
    file, row and field for an invalid row or a row left with no trained token.
    """
    if train_on not in TRAIN_ON:
        raise ValueError(f"train_on must be one of {', '.join(TRAIN_ON)}, got {train_on!r}")
    if max_length is not None and max_length < 2:
        raise ValueError(f"max_length must be at least 2 tokens (or None), got {max_length}")
    ex = validate_record(row, fmt)
    if ex.fmt == TOKENIZED:
        ids, labels = pretokenized_labels(ex, tokenizer)
    elif ex.fmt == TEXT:
        ids, labels = _tokenize_text(ex.text, tokenizer)
    elif ex.fmt == PROMPT_COMPLETION and not ex.conversational:
        ids, labels = _tokenize_prompt_completion(ex.prompt, ex.completion, tokenizer)
    else:
        if ex.messages is not None:
            messages, first = ex.messages, 0
        else:  # conversational prompt-completion: train the completion's assistant messages only
            messages, first = ex.prompt + ex.completion, len(ex.prompt)
        trained = [i for i in range(first, len(messages)) if messages[i]["role"] == "assistant"]
        if train_on == "last_assistant":
            trained = trained[-1:]
        ids, labels = _tokenize_chat(ex, messages, trained, tokenizer, chat_template)
    return _truncate(ex, ids, labels, max_length)


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
) -> list[dict[str, list[int]]]:
    """Tokenize every record (see :func:`tokenize_record`); the format is detected from the first record.

    OpenAssistant tree rows are first expanded into their root-to-leaf conversations (see
    :func:`~pronghorn.data.oasst.oasst_conversations`; ``oasst_best_only`` picks top-ranked replies only).
    Bad rows are collected (up to 10) and reported together in one :class:`DataError`.
    """
    records = [as_record(r, "<memory>", i) for i, r in enumerate(records)]
    if not records:
        raise DataError("the dataset is empty (no rows)")
    fmt = detect_format(records[0]) if fmt is None else check_format_name(fmt)
    if fmt == OASST:
        records, fmt = oasst_conversations(records, best_only=oasst_best_only, source=records[0].source), MESSAGES
    out, errors = [], []
    for rec in _progress(records, f"Tokenizing {fmt} rows", progress):
        try:
            out.append(tokenize_record(rec, tokenizer, fmt, max_length, train_on=train_on, chat_template=chat_template))
        except DataError as e:
            errors.append(str(e))
            if len(errors) >= _MAX_REPORTED_ERRORS:
                break
    if errors:
        more = " (stopped at the first 10)" if len(errors) >= _MAX_REPORTED_ERRORS else ""
        if len(errors) == 1:
            raise DataError(errors[0])
        raise DataError(f"{len(errors)} bad rows{more}:\n  " + "\n  ".join(errors))
    return out


# -- per-format tokenization -----------------------------------------------------------------------------


def _tokenize_text(text: str, tokenizer: Any) -> tuple[list[int], list[int]]:
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    eos = _eos_id(tokenizer)
    if not ids or ids[-1] != eos:
        ids.append(eos)
    return ids, list(ids)


def _tokenize_prompt_completion(prompt: str, completion: str, tokenizer: Any) -> tuple[list[int], list[int]]:
    full = prompt + completion
    ids, offsets = _encode_with_offsets(tokenizer, full, add_special_tokens=True)
    labels = _labels_for_spans(ids, offsets, [(len(prompt), len(full))])
    eos = _eos_id(tokenizer)
    if ids and ids[-1] == eos:  # the tokenizer appends EOS itself, or the completion ends with it
        labels[-1] = eos
    else:
        ids.append(eos)
        labels.append(eos)
    return ids, labels


def _tokenize_chat(
    ex: Example, messages: list[dict], trained: list[int], tokenizer: Any, chat_template: str | None
) -> tuple[list[int], list[int]]:
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
    spans = []
    for i in trained:
        start_text = render(messages[:i], True)
        end_text = render(messages[: i + 1], False)
        for prefix, what in ((start_text, f"the first {i} messages with add_generation_prompt=True"),
                             (end_text, f"the first {i + 1} messages")):
            if not full.startswith(prefix):
                raise rec.error(
                    _message_field(ex, i),
                    f"the chat template's rendering of {what} is not a prefix of the full conversation's "
                    "rendering (the template rewrites or drops earlier turns), so the assistant turns cannot be "
                    "located by character offsets; use a template that renders each turn independently",
                )
        if len(end_text) <= len(start_text):
            raise rec.error(_message_field(ex, i), "the chat template renders this assistant message as nothing")
        for call in messages[i].get("tool_calls") or []:
            if call["function"]["name"] not in end_text[len(start_text):]:
                raise rec.error(
                    f"{_message_field(ex, i)}.tool_calls",
                    f"the chat template does not render tool calls (the call to {call['function']['name']!r} "
                    "is missing from its rendering); use a chat template that supports tool calling",
                )
        spans.append((len(start_text), len(end_text)))
    for j, msg in enumerate(messages):
        if msg["role"] == "tool" and msg["content"].strip() not in full:
            raise rec.error(
                _message_field(ex, j),
                "the chat template does not render tool messages (this tool result is missing from the "
                "rendering); use a chat template that supports the 'tool' role",
            )

    ids, offsets = _encode_with_offsets(tokenizer, full, add_special_tokens=False)
    specials = _special_ids(tokenizer)
    labels = [IGNORE_INDEX] * len(ids)
    for start, end in spans:
        toks = [t for t in range(len(ids)) if _overlaps(offsets[t], start, end)]
        last_special = max((t for t in toks if ids[t] in specials), default=None)
        for t in toks:
            if last_special is None or t <= last_special:
                labels[t] = ids[t]
    return ids, labels


def _truncate(ex: Example, ids: list[int], labels: list[int], max_length: int | None) -> dict[str, list[int]]:
    n = len(ids)
    # labels[0] is never a target (the model predicts token t+1 from tokens <= t)
    first = next((t for t in range(1, n) if labels[t] != IGNORE_INDEX), None)
    if max_length is not None and n > max_length:
        ids, labels = ids[:max_length], labels[:max_length]
        if first is not None and first >= max_length:
            raise ex.record.error(
                ex.field,
                f"no trainable token after truncation to {max_length} tokens (the row has {n} tokens and the "
                f"first trained one is at position {first}); raise max_length or shorten the prompt",
            )
    if first is None:
        raise ex.record.error(ex.field, f"no trainable token (the row has {n} tokens, none of them trained)")
    return {"input_ids": ids, "labels": labels}


# -- helpers ---------------------------------------------------------------------------------------------


def _encode_with_offsets(tokenizer: Any, text: str, add_special_tokens: bool) -> tuple[list[int], list[tuple]]:
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(
            f"{type(tokenizer).__name__} is not a fast tokenizer; computing label masks needs "
            "return_offsets_mapping (load it with use_fast=True)"
        )
    enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def _overlaps(offset: tuple[int, int], start: int, end: int) -> bool:
    a, b = offset
    if a == b:  # zero-width token (e.g. one a post-processor added): inside if it sits in the span
        return start <= a < end
    return a < end and b > start


def _labels_for_spans(ids: list[int], offsets: list[tuple], spans: list[tuple[int, int]]) -> list[int]:
    return [
        tok if any(_overlaps(off, s, e) for s, e in spans) else IGNORE_INDEX for tok, off in zip(ids, offsets)
    ]


def _special_ids(tokenizer: Any) -> set[int]:
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for tok_id, added in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).items():
        if getattr(added, "special", False):
            ids.add(tok_id)
    return ids


def _eos_id(tokenizer: Any) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ValueError("the tokenizer has no eos_token; set tokenizer.eos_token so rows can end with it")
    return eos


def _message_field(ex: Example, i: int) -> str:
    return ex.message_field(i)


def _progress(items: Iterable, description: str, enabled: bool) -> Iterable:
    if not enabled:
        return items
    from rich.progress import track

    return track(items, description=description, transient=True)
