"""Prompt rows for GRPO: rows -> validated prompts + token ids, the other columns kept for the reward functions.

Row layouts (TRL's prompt-only formats, plus gsm8k as published):

- ``{"prompt": str, ...}``: a plain prompt, tokenized with the tokenizer's special tokens (BOS), as TRL does.
- ``{"prompt": [{"role", "content"}...], ...}``: a conversation ending in a user (or system) turn, rendered with
  the chat template and ``add_generation_prompt=True``, then tokenized without special tokens.
- gsm8k (openai/grade-school-math): ``{"question", "answer"}`` becomes the conversation
  ``[system: GSM8K_SYSTEM_PROMPT, user: question]`` and ``answer`` the final number after ``####`` (the reward
  functions compare with it); the full worked answer stays in ``solution``.

Every other column is kept as is: the trainer passes them to the reward functions as keyword arguments
(lists, one value per completion), as TRL does. ``max_prompt_length`` keeps the end of a longer prompt.
"""

from __future__ import annotations

from typing import Any, Sequence

import jinja2

from ..errors import DataError
from .records import Record, as_record
from .row_checks import ROLES, type_name

__all__ = ["GSM8K_SYSTEM_PROMPT", "final_answer", "prompt_rows"]

GSM8K_SYSTEM_PROMPT = ("Solve the problem. Reason step by step, then give the final answer on its own last line "
                       "as '#### <number>'.")
ANSWER_MARK = "####"


def final_answer(text: str) -> str | None:
    """The number after the last ``####`` of ``text`` (commas and a trailing period dropped), or None."""
    if ANSWER_MARK not in text:
        return None
    tail = text.rsplit(ANSWER_MARK, 1)[1].strip().splitlines()
    if not tail:
        return None
    return tail[0].strip().replace(",", "").rstrip(".") or None


def _prompt(rec: Record) -> dict[str, Any]:
    row = dict(rec.row)
    if "prompt" not in row and {"question", "answer"} <= set(row):  # gsm8k
        question, solution = row.pop("question"), row.pop("answer")
        for field, value in (("question", question), ("answer", solution)):
            if not isinstance(value, str) or not value.strip():
                raise rec.error(field, f"must be a non-empty string, got {type_name(value)}")
        number = final_answer(solution)
        if number is None:
            raise rec.error("answer", f"has no final '{ANSWER_MARK} <number>' line")
        row["prompt"] = [{"role": "system", "content": GSM8K_SYSTEM_PROMPT}, {"role": "user", "content": question}]
        row.update(answer=number, solution=solution)
        return row
    if "prompt" not in row:
        raise rec.error("prompt", f"missing (a prompt row has 'prompt', or gsm8k's 'question' and 'answer'; "
                                  f"found {sorted(row)})")
    prompt = row["prompt"]
    if isinstance(prompt, str):
        if not prompt.strip():
            raise rec.error("prompt", "is empty")
        return row
    if not isinstance(prompt, list) or not prompt:
        raise rec.error("prompt", f"must be a string or a non-empty list of messages, got {type_name(prompt)}")
    for i, msg in enumerate(prompt):
        if not isinstance(msg, dict) or not isinstance(msg.get("content"), str) or msg.get("role") not in ROLES:
            raise rec.error(f"prompt[{i}]", f"expected {{'role': one of {', '.join(ROLES)}, 'content': str}}")
    if prompt[-1]["role"] == "assistant":
        raise rec.error(f"prompt[{len(prompt) - 1}].role", "a prompt ends with a user turn (the model answers it)")
    return row


def encode_prompt(rec: Record, prompt: str | list[dict], tokenizer: Any) -> list[int]:
    """Token ids of one prompt (plain: with the tokenizer's special tokens; conversational: the chat template with
    the generation prompt, no special tokens added)."""
    if isinstance(prompt, str):
        return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    if not getattr(tokenizer, "chat_template", None):
        raise rec.error("prompt", "is a conversation but the tokenizer has no chat template")
    try:
        text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    except jinja2.TemplateError as e:
        raise rec.error("prompt", f"the chat template failed to render it: {e}") from None
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def prompt_rows(records: Sequence[Record | dict], tokenizer: Any, max_prompt_length: int | None = None
                ) -> list[dict[str, Any]]:
    """``{"prompt", "prompt_ids", **other columns}`` per record (module docstring); a bad row raises a
    :class:`DataError` naming its file, row and field."""
    rows = []
    for i, r in enumerate(records):
        rec = as_record(r, index=i)
        row = _prompt(rec)
        ids = encode_prompt(rec, row["prompt"], tokenizer)
        if not ids:
            raise rec.error("prompt", "encodes to no token")
        if max_prompt_length is not None:
            ids = ids[-max_prompt_length:]  # keep the end: the turn being answered
        rows.append({**row, "prompt_ids": ids})
    if not rows:
        raise DataError("no prompt rows")
    return rows
