"""Preference (DPO / ORPO / SimPO) and KTO data: rows -> validated pairs -> prompt ids + completion ids + masks.

Row layouts (detected per row):

- ``{"prompt", "chosen", "rejected"}``: strings, or lists of ``{"role", "content"}`` messages (TRL's standard
  and conversational preference formats). Without ``prompt`` the prompt is implicit, as in TRL: the shared
  prefix of the chosen and rejected message lists (cut back to end on a user message), or of the strings.
- Anthropic hh-rlhf: ``chosen`` / ``rejected`` are whole transcripts ``"\\n\\nHuman: ...\\n\\nAssistant: ..."``;
  they are parsed into messages and the shared prefix is the prompt.
- ShareGPT preference (LLaMA-Factory ``dpo`` format): ``{"conversations": [{"from", "value"}...],
  "chosen": {"from": "gpt", "value"}, "rejected": {...}}``.
- OpenAssistant trees (see :mod:`pronghorn.data.oasst`): every pair of ranked sibling assistant replies is a
  pair (the better rank is chosen), the prompt is the conversation up to their parent.
- KTO: ``{"prompt", "completion", "label"}`` (strings or messages) or ``{"messages", "label"}`` (the last
  assistant message is the completion); ``label`` is true for a desirable completion.

Tokenization (as TRL's trainers do it): a conversational prompt is rendered with the chat template and
``add_generation_prompt=True``; a completion is the rest of the rendering of prompt + completion, tokenized
on its own (so the chosen and rejected rows share the prompt ids exactly). Its loss mask covers the completion
up to and including its last special token (the end-of-turn marker), like the SFT tokenizer; a plain-string
completion gets EOS appended and is trained whole. Truncation: ``max_prompt_length`` keeps the end of the
prompt; completions are cut to ``max_length - len(prompt)`` tokens, keeping their start.

Bad rows (chosen == rejected, an empty completion, a prompt with no room left under ``max_length``, and any
malformed row) are reported together, naming file, row and field (:class:`DataError`, up to 10 listed); with
``skip_bad_rows=True`` they are dropped instead, and the result's ``skipped`` lists why.
"""

from __future__ import annotations

import gzip
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import jinja2

from ..errors import DataError, spell
from .chat_templates import special_token_ids
from .convert import sharegpt_messages
from .oasst import OASST_ROLES, check_node, is_oasst_tree
from .records import Record, as_record, load_records, parse_jsonl
from .row_checks import check_conversation

__all__ = ["KTOExample", "PreferencePair", "CheckedRows", "kto_examples", "load_preference_records",
           "preference_pairs", "tokenize_kto", "tokenize_preference"]

_MAX_REPORTED = 10
_HH_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")


@dataclass(frozen=True)
class PreferencePair:
    """A validated pair. ``prompt``/``chosen``/``rejected`` are all strings or all message lists."""

    record: Record
    prompt: str | list[dict]
    chosen: str | list[dict]
    rejected: str | list[dict]
    chosen_field: str = "chosen"
    rejected_field: str = "rejected"

    @property
    def conversational(self) -> bool:
        return isinstance(self.chosen, list)


@dataclass(frozen=True)
class KTOExample:
    record: Record
    prompt: str | list[dict]
    completion: str | list[dict]
    label: bool
    completion_field: str = "completion"

    @property
    def conversational(self) -> bool:
        return isinstance(self.completion, list)


class CheckedRows(list):
    """Validated or tokenized rows; ``skipped`` names each bad row dropped with ``skip_bad_rows=True``."""

    skipped: list[str]

    def __init__(self, rows=(), skipped=()):
        super().__init__(rows)
        self.skipped = list(skipped)


def load_preference_records(source: Any) -> list[Record]:
    """:func:`~pronghorn.data.records.load_records`, plus gzip-compressed JSONL (``.jsonl.gz``, hh-rlhf)."""
    path = Path(source) if isinstance(source, (str, Path)) else None
    if path is not None and path.name.endswith(".jsonl.gz"):
        if not path.is_file():
            raise DataError(f"{path}: no such file")
        try:
            text = gzip.decompress(path.read_bytes()).decode("utf-8-sig")
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"{path}: not gzip-compressed UTF-8 JSONL ({e})") from None
        records = parse_jsonl(text, str(path))
        if not records:
            raise DataError(f"{path}: the dataset is empty (no rows)")
        return records
    return load_records(source)


# -- rows -> pairs ---------------------------------------------------------------------------------------


def preference_pairs(records: Iterable[Record | Mapping[str, Any]], *, skip_bad_rows: bool = False,
                     source: str = "<memory>") -> list[PreferencePair]:
    """Validate preference rows of any layout above (OpenAssistant trees expand to their ranked pairs)."""
    pairs, bad = [], []
    for i, row in enumerate(records):
        rec = as_record(row, source, i)
        try:
            if is_oasst_tree(rec.row):
                pairs.extend(_oasst_pairs(rec))
            else:
                pairs.append(_pair(rec))
        except DataError as e:
            bad.append(str(e))
    return _finish(pairs, bad, skip_bad_rows, "preference pairs")


def kto_examples(records: Iterable[Record | Mapping[str, Any]], *, skip_bad_rows: bool = False,
                 source: str = "<memory>") -> list[KTOExample]:
    """Validate KTO rows: ``{"prompt", "completion", "label"}`` or ``{"messages", "label"}``."""
    out, bad = [], []
    for i, row in enumerate(records):
        rec = as_record(row, source, i)
        try:
            out.append(_kto(rec))
        except DataError as e:
            bad.append(str(e))
    return _finish(out, bad, skip_bad_rows, "KTO examples")


def _finish(items: list, bad: list[str], skip_bad_rows: bool, what: str):
    if bad and not skip_bad_rows:
        raise DataError(_bad_rows_message(bad))
    if bad:
        warnings.warn(f"skipped {len(bad)} bad rows (first: {bad[0]})", stacklevel=3)
    if not items:
        raise DataError(f"no usable {what}" + (f" ({len(bad)} bad rows skipped)" if bad else ""))
    return CheckedRows(items, bad)


def _bad_rows_message(bad: list[str]) -> str:
    if len(bad) == 1:
        return bad[0]
    shown = bad[:_MAX_REPORTED]
    more = f" (first {_MAX_REPORTED} shown)" if len(bad) > _MAX_REPORTED else ""
    return f"{len(bad)} bad rows{more}; pass {spell('skip_bad_rows', True)} to drop them:\n  " + "\n  ".join(shown)


def _is_messages(value: Any) -> bool:
    return isinstance(value, list)


def _pair(rec: Record) -> PreferencePair:
    row = rec.row
    for key in ("chosen", "rejected"):
        if key not in row:
            raise rec.error(key, "missing (a preference row needs 'chosen' and 'rejected')")
    chosen, rejected = row["chosen"], row["rejected"]
    if isinstance(chosen, dict) or isinstance(rejected, dict):
        return _sharegpt_pair(rec)
    if isinstance(chosen, str) and isinstance(rejected, str) and "prompt" not in row \
            and _HH_TURN.match(chosen) and _HH_TURN.match(rejected):
        chosen, rejected = _hh_messages(rec, "chosen", chosen), _hh_messages(rec, "rejected", rejected)
        return _split_messages(rec, None, chosen, rejected)
    if _is_messages(chosen) and _is_messages(rejected):
        prompt = row.get("prompt")
        if prompt is not None and not _is_messages(prompt):
            raise rec.error("prompt", "must be a list of messages like 'chosen' and 'rejected'")
        return _split_messages(rec, prompt, chosen, rejected)
    for key, value in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(value, str):
            raise rec.error(key, f"must be a string or a list of messages, got {type(value).__name__}")
    if "prompt" in row:
        prompt = row["prompt"]
        if not isinstance(prompt, str):
            raise rec.error("prompt", f"must be a string like 'chosen' and 'rejected', got {type(prompt).__name__}")
    else:  # implicit prompt: the shared prefix of the strings (TRL's extract_prompt)
        n = _common_prefix(chosen, rejected)
        if n and chosen[n - 1] == " ":  # the space before a word belongs to the completion
            n -= 1
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    _check_completions(rec, chosen, rejected)
    return PreferencePair(rec, prompt, chosen, rejected)


def _common_prefix(a: Sequence, b: Sequence) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _check_completions(rec: Record, chosen, rejected, fields=("chosen", "rejected")) -> None:
    for field, value in zip(fields, (chosen, rejected)):
        text = value if isinstance(value, str) else "".join(str(m.get("content") or "") for m in value)
        if not value or not text.strip():
            raise rec.error(field, "empty completion (nothing to compare once the shared prompt is removed)")
    if chosen == rejected:
        raise rec.error(fields[0], "chosen == rejected (identical completions; the pair carries no preference)")


def _split_messages(rec: Record, prompt: list | None, chosen: list, rejected: list) -> PreferencePair:
    if prompt is None:  # implicit prompt: the shared prefix, ending on a user message
        n = _common_prefix(chosen, rejected)
        while n > 0 and not (isinstance(chosen[n - 1], dict) and chosen[n - 1].get("role") == "user"):
            n -= 1
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
        pf = ("chosen", "chosen", "rejected")
        offsets = (0, n, n)
    else:
        pf, offsets = ("prompt", "chosen", "rejected"), (0, 0, 0)
    _check_completions(rec, chosen, rejected)
    if not prompt:
        raise rec.error(pf[0], "no prompt (no user message before the completions)")
    for field, value in (("chosen", chosen), ("rejected", rejected)):
        labelled = [(f"{pf[0]}[{i + offsets[0]}]", m) for i, m in enumerate(prompt)]
        labelled += [(f"{field}[{i + offsets[1]}]", m) for i, m in enumerate(value)]
        check_conversation(rec, labelled)
    return PreferencePair(rec, prompt, chosen, rejected)


def _hh_messages(rec: Record, field: str, text: str) -> list[dict]:
    parts = _HH_TURN.split(text)
    if parts[0].strip():
        raise rec.error(field, "an hh-rlhf transcript must start with '\\n\\nHuman: '")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[who], "content": body.strip()} for who, body in zip(parts[1::2], parts[2::2])]


def _sharegpt_pair(rec: Record) -> PreferencePair:
    row = rec.row
    if "conversations" not in row:
        raise rec.error("conversations", "missing (a ShareGPT preference row needs 'conversations')")
    prompt = sharegpt_messages(rec, "conversations")
    completions = []
    for key in ("chosen", "rejected"):
        turn = row[key]
        if not isinstance(turn, dict):
            raise rec.error(key, f"must be a {{'from', 'value'}} turn like the other one, got {type(turn).__name__}")
        msgs = sharegpt_messages(Record(rec.source, rec.index, {key: [turn]}, rec.kind), key) \
            if str(turn.get("value", "")).strip() else []
        completions.append(msgs)
    _check_completions(rec, *completions)
    for key, msgs in zip(("chosen", "rejected"), completions):
        labelled = [(f"conversations[{i}]", m) for i, m in enumerate(prompt)] + [(key, m) for m in msgs]
        check_conversation(rec, labelled, keys=("from", "value"))
    return PreferencePair(rec, prompt, completions[0], completions[1])


def _oasst_pairs(rec: Record) -> list[PreferencePair]:
    pairs: list[PreferencePair] = []

    def walk(node: dict, path: str, parent_role: str | None, msgs: list[dict]) -> None:
        check_node(rec, node, path, parent_role)
        if node.get("deleted", False):
            return
        msgs = msgs + [{"role": OASST_ROLES[node["role"]], "content": node["text"]}]
        replies = [(j, r) for j, r in enumerate(node.get("replies") or [])]
        for j, child in replies:
            walk(child, f"{path}.replies[{j}]", node["role"], msgs)
        if node["role"] != "prompter":
            return
        ranked = [(j, r) for j, r in replies if not r.get("deleted", False) and isinstance(r.get("rank"), int)]
        for a, (ja, ra) in enumerate(ranked):
            for jb, rb in ranked[a + 1:]:
                if ra["rank"] == rb["rank"]:
                    continue
                (jc, rc), (jr, rr) = sorted(((ja, ra), (jb, rb)), key=lambda t: t[1]["rank"])
                pairs.append(PreferencePair(
                    rec, msgs, [{"role": "assistant", "content": rc["text"]}],
                    [{"role": "assistant", "content": rr["text"]}],
                    f"{path}.replies[{jc}].text", f"{path}.replies[{jr}].text"))

    if "prompt" not in rec.row:
        raise rec.error("prompt", "missing (an OpenAssistant tree row needs a 'prompt' message node)")
    walk(rec.row["prompt"], "prompt", None, [])
    return pairs


def _kto(rec: Record) -> KTOExample:
    row = rec.row
    if "label" not in row:
        raise rec.error("label", "missing (a KTO row needs a boolean 'label': true = desirable)")
    label = row["label"]
    if not isinstance(label, bool):
        raise rec.error("label", f"must be true or false, got {label!r}")
    if "messages" in row and "completion" not in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise rec.error("messages", "must be a non-empty list of messages")
        check_conversation(rec, [(f"messages[{i}]", m) for i, m in enumerate(msgs)])
        return KTOExample(rec, msgs[:-1], msgs[-1:], label, f"messages[{len(msgs) - 1}]")
    for key in ("prompt", "completion"):
        if key not in row:
            raise rec.error(key, "missing (a KTO row needs 'prompt' + 'completion', or 'messages')")
    prompt, completion = row["prompt"], row["completion"]
    if _is_messages(prompt) and _is_messages(completion):
        if not completion:
            raise rec.error("completion", "empty completion")
        labelled = [(f"prompt[{i}]", m) for i, m in enumerate(prompt)]
        labelled += [(f"completion[{i}]", m) for i, m in enumerate(completion)]
        check_conversation(rec, labelled)
        return KTOExample(rec, prompt, completion, label)
    if not (isinstance(prompt, str) and isinstance(completion, str)):
        raise rec.error("completion", "prompt and completion must both be strings or both lists of messages")
    if not completion.strip():
        raise rec.error("completion", "empty completion")
    return KTOExample(rec, prompt, completion, label)


# -- tokenization ----------------------------------------------------------------------------------------


def tokenize_preference(pairs: Sequence[PreferencePair | Record | Mapping[str, Any]], tokenizer: Any,
                        max_length: int | None = 1024, max_prompt_length: int | None = None, *,
                        chat_template: str | None = None, skip_bad_rows: bool = False) -> CheckedRows:
    """Each pair -> ``{"prompt_ids", "chosen_ids", "chosen_mask", "rejected_ids", "rejected_mask"}``."""
    if pairs and not isinstance(pairs[0], PreferencePair):
        pairs = preference_pairs(pairs, skip_bad_rows=skip_bad_rows)
    skipped = list(getattr(pairs, "skipped", []))
    out, bad = [], []
    for p in pairs:
        try:
            sides = [(p.chosen_field, p.chosen), (p.rejected_field, p.rejected)]
            prompt_ids, comps = _encode(p.record, p.prompt, sides, tokenizer, chat_template)
            prompt_ids, comps = _truncate(p.record, prompt_ids, comps, max_length, max_prompt_length)
            (c_field, (c_ids, c_mask)), (r_field, (r_ids, r_mask)) = comps
            if c_ids == r_ids:
                raise p.record.error(c_field, "chosen == rejected after tokenization and truncation to "
                                              f"{max_length} tokens (the pair carries no preference)")
            out.append({"prompt_ids": prompt_ids, "chosen_ids": c_ids, "chosen_mask": c_mask,
                        "rejected_ids": r_ids, "rejected_mask": r_mask})
        except DataError as e:
            bad.append(str(e))
    return _finish_tokenized(out, skipped, bad, skip_bad_rows)


def tokenize_kto(examples: Sequence[KTOExample | Record | Mapping[str, Any]], tokenizer: Any,
                 max_length: int | None = 1024, max_prompt_length: int | None = None, *,
                 chat_template: str | None = None, skip_bad_rows: bool = False) -> CheckedRows:
    """Each example -> ``{"prompt_ids", "completion_ids", "completion_mask", "label"}``."""
    if examples and not isinstance(examples[0], KTOExample):
        examples = kto_examples(examples, skip_bad_rows=skip_bad_rows)
    skipped = list(getattr(examples, "skipped", []))
    out, bad = [], []
    for ex in examples:
        try:
            prompt_ids, comps = _encode(ex.record, ex.prompt, [(ex.completion_field, ex.completion)], tokenizer,
                                        chat_template)
            prompt_ids, ((_, (ids, mask)),) = _truncate(ex.record, prompt_ids, comps, max_length, max_prompt_length)
            out.append({"prompt_ids": prompt_ids, "completion_ids": ids, "completion_mask": mask,
                        "label": ex.label})
        except DataError as e:
            bad.append(str(e))
    return _finish_tokenized(out, skipped, bad, skip_bad_rows)


def _finish_tokenized(out: list, skipped: list[str], bad: list[str], skip_bad_rows: bool) -> CheckedRows:
    if bad and not skip_bad_rows:
        raise DataError(_bad_rows_message(bad))
    if bad:
        warnings.warn(f"skipped {len(bad)} rows at tokenization (first: {bad[0]})", stacklevel=3)
    if not out:
        raise DataError("no usable row left after tokenization" + (f" ({len(bad)} bad rows)" if bad else ""))
    return CheckedRows(out, skipped + bad)


def _encode(rec: Record, prompt, completions: list[tuple[str, Any]], tokenizer: Any,
            chat_template: str | None) -> tuple[list[int], list[tuple[str, tuple[list[int], list[int]]]]]:
    if not isinstance(prompt, list):  # plain strings: prompt with the tokenizer's specials, completion + EOS
        prompt_ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"]) if prompt else \
            _bos(tokenizer)
        eos = tokenizer.eos_token_id
        if eos is None:
            raise ValueError("the tokenizer has no eos_token; set tokenizer.eos_token so completions can end")
        out = []
        for field, text in completions:
            ids = list(tokenizer(text, add_special_tokens=False)["input_ids"]) + [eos]
            out.append((field, (ids, [1] * len(ids))))
        return prompt_ids, out
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template; pass chat_template= to render conversational rows")

    def render(msgs: list[dict], generation_prompt: bool) -> str:
        try:
            return tokenizer.apply_chat_template(msgs, chat_template=chat_template, tokenize=False,
                                                 add_generation_prompt=generation_prompt)
        except jinja2.TemplateError as e:
            raise rec.error(completions[0][0], f"the chat template failed to render this conversation: {e}") from None

    prompt_text = render(prompt, True)
    prompt_ids = list(tokenizer(prompt_text, add_special_tokens=False)["input_ids"])
    specials = special_token_ids(tokenizer)
    out = []
    for field, msgs in completions:
        full = render(prompt + msgs, False)
        if not full.startswith(prompt_text):
            raise rec.error(field, "the chat template's rendering of the prompt (with add_generation_prompt=True) "
                                   "is not a prefix of the rendering of prompt + completion")
        ids = list(tokenizer(full[len(prompt_text):], add_special_tokens=False)["input_ids"])
        last = max((t for t, i in enumerate(ids) if i in specials), default=len(ids) - 1)
        out.append((field, (ids, [1] * (last + 1) + [0] * (len(ids) - last - 1))))
    return prompt_ids, out


def _truncate(rec: Record, prompt_ids: list[int], comps, max_length: int | None, max_prompt_length: int | None):
    if max_prompt_length is not None and len(prompt_ids) > max_prompt_length:
        prompt_ids = prompt_ids[-max_prompt_length:]  # keep the end: the turn being answered
    if max_length is None:
        kept = comps
    else:
        room = max_length - len(prompt_ids)
        if room < 1:
            raise rec.error("prompt",
                            f"prompt longer than max_length: {len(prompt_ids)} prompt tokens leave no room for the "
                            f"completion under max_length={max_length} (raise max_length or set max_prompt_length)")
        kept = [(f, (ids[:room], mask[:room])) for f, (ids, mask) in comps]
    for f, (ids, mask) in kept:
        if not any(mask):
            raise rec.error(f, "empty completion (no trained token)" + (
                f" after truncation to max_length={max_length}" if max_length is not None else ""))
    return prompt_ids, kept


def _bos(tokenizer: Any) -> list[int]:
    bos = getattr(tokenizer, "bos_token_id", None)
    return [bos] if bos is not None else []

