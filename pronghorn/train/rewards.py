"""Built-in reward functions (TRL's signature: ``f(prompts, completions, **columns) -> list[float]``) and how
``reward_funcs`` names are resolved: a built-in name, or a ``"module:function"`` import path the user wrote
(only what is named is imported), or (Python API) a callable.

gsm8k (prompts from :mod:`pronghorn.data.prompts`, which asks for reasoning then a final ``#### <number>`` line):

- ``gsm8k_format``: 1.0 when the completion has at least one line of reasoning and its last non-empty line is
  ``#### <number>``; else 0.0.
- ``gsm8k_format_partial``: a shaped format reward for small models that rarely hit the format at first (a
  binary reward that is 0.0 for every completion of a group gives no advantage to learn from): 1.0 for
  ``gsm8k_format``'s format, 0.5 when a ``#### <number>`` line is there but is not the last line or has no
  reasoning before it, else 0.0.
- ``gsm8k_correct``: 1.0 when the number after the completion's last ``####`` equals the row's ``answer``
  (gsm8k's number after ``####``; compared as numbers, commas ignored); else 0.0.
"""

from __future__ import annotations

import importlib
import re
from typing import Any, Callable

from ..data.prompts import final_answer
from ..errors import PronghornError

_FINAL_LINE = re.compile(r"^####\s*-?[\d,]*\.?\d+\.?$")


def completion_text(completion: Any) -> str:
    """A completion as text: a string, or a conversational completion's (last) message content."""
    if isinstance(completion, list):
        return completion[-1]["content"] if completion else ""
    return completion


def _number(text: str | None) -> float | None:
    try:
        return float(text.replace(",", "")) if text is not None else None
    except ValueError:
        return None


def gsm8k_format(prompts: list, completions: list, **_: Any) -> list[float]:
    out = []
    for c in completions:
        lines = [line.strip() for line in completion_text(c).strip().splitlines() if line.strip()]
        out.append(1.0 if len(lines) >= 2 and _FINAL_LINE.match(lines[-1]) else 0.0)
    return out


def gsm8k_format_partial(prompts: list, completions: list, **_: Any) -> list[float]:
    full = gsm8k_format(prompts, completions)
    marked = [any(_FINAL_LINE.match(line.strip()) for line in completion_text(c).splitlines()) for c in completions]
    return [f if f else 0.5 * m for f, m in zip(full, marked)]


def gsm8k_correct(prompts: list, completions: list, answer: list, **_: Any) -> list[float]:
    out = []
    for c, a in zip(completions, answer):
        got, want = _number(final_answer(completion_text(c))), _number(final_answer(str(a)) or str(a))
        out.append(1.0 if got is not None and want is not None and got == want else 0.0)
    return out


BUILTIN_REWARDS: dict[str, Callable] = {"gsm8k_format": gsm8k_format, "gsm8k_format_partial": gsm8k_format_partial,
                                         "gsm8k_correct": gsm8k_correct}


def resolve_reward(spec: str | Callable) -> Callable:
    """A callable for a built-in name or a ``"module:function"`` path (imported here), or ``spec`` itself."""
    if callable(spec):
        return spec
    if not isinstance(spec, str):
        raise PronghornError(f"reward_funcs: {spec!r} is neither a name, a 'module:function' path nor a callable")
    if spec in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[spec]
    if ":" not in spec:
        raise PronghornError(f"reward_funcs: unknown reward {spec!r}; built-in: {', '.join(BUILTIN_REWARDS)}, or "
                             "an import path 'module:function'")
    module, name = spec.split(":", 1)
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise PronghornError(f"reward_funcs: cannot import {spec!r} ({type(e).__name__}: {e})") from None
    if not callable(fn):
        raise PronghornError(f"reward_funcs: {spec!r} is not callable")
    return fn


def reward_name(fn: Callable) -> str:
    """The name metrics use (``rewards/<name>/mean``): the function's ``__name__``, as TRL."""
    return getattr(fn, "__name__", None) or type(fn).__name__
