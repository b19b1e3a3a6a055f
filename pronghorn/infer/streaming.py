"""Printing generated text as it is produced (the streamer protocol of transformers: ``put`` / ``end``)."""

from __future__ import annotations

import sys
from typing import Any, TextIO

import torch

_REPLACEMENT = "\ufffd"


class TerminalStreamer:
    """Print decoded text incrementally; usable wherever transformers' ``TextStreamer`` is.

    ``put`` first receives the prompt (skipped when ``skip_prompt``), then new token ids. Text is printed
    only once it no longer ends in an incomplete character (U+FFFD from a partial UTF-8 sequence), so
    characters spread over several byte tokens appear whole. ``decode_kwargs`` (e.g.
    ``skip_special_tokens=True``) go to ``tokenizer.decode``.
    """

    def __init__(self, tokenizer: Any, skip_prompt: bool = True, file: TextIO | None = None, **decode_kwargs: Any):
        self.tokenizer = tokenizer
        self.skip_prompt = skip_prompt
        self.file = file
        self.decode_kwargs = decode_kwargs
        self._ids: list[int] = []
        self._printed = 0  # characters of decode(self._ids) already printed
        self._next_is_prompt = True

    def put(self, value: torch.Tensor | list[int] | int) -> None:
        if isinstance(value, torch.Tensor):
            if value.dim() > 1:
                if value.shape[0] > 1:
                    raise ValueError(f"TerminalStreamer supports a batch of one; got {value.shape[0]} rows")
                value = value[0]
            value = value.tolist()
        ids = [value] if isinstance(value, int) else list(value)
        is_prompt, self._next_is_prompt = self._next_is_prompt, False
        if is_prompt and self.skip_prompt:
            return
        self._ids.extend(int(i) for i in ids)
        text = self.tokenizer.decode(self._ids, **self.decode_kwargs)
        if text.endswith(_REPLACEMENT):
            return  # a multi-byte character is not complete yet
        self._write(text[self._printed:])
        if text.endswith("\n"):  # start afresh: keeps each decode short
            self._ids, self._printed = [], 0
        else:
            self._printed = len(text)

    def end(self) -> None:
        """Flush what is left (even an incomplete character), end the line, and get ready for a new prompt."""
        if self._ids:
            text = self.tokenizer.decode(self._ids, **self.decode_kwargs)
            self._write(text[self._printed:])
        self._write("\n")
        self._ids, self._printed, self._next_is_prompt = [], 0, True

    def _write(self, text: str) -> None:
        if text:
            out = self.file if self.file is not None else sys.stdout
            out.write(text)
            out.flush()
