"""TerminalStreamer: incremental printing that never shows half a character."""

import io

import pytest
import torch

from helpers import make_pair
from pronghorn.infer import TerminalStreamer, generate


class ByteTokenizer:
    """Ids 0..94 are the printable ASCII characters; 95 and 96 are the two UTF-8 bytes of 'é'."""

    def decode(self, ids, skip_special_tokens=False, **kwargs):
        data = b"".join(bytes([32 + i]) if i < 95 else (b"\xc3" if i == 95 else b"\xa9") for i in ids)
        return data.decode("utf-8", errors="replace")

    def encode(self, text):
        return [ord(c) - 32 for c in text]


class Recorder(io.StringIO):
    def __init__(self):
        super().__init__()
        self.writes = []

    def write(self, s):
        self.writes.append(s)
        return super().write(s)


def test_prints_whole_characters_only_and_skips_the_prompt():
    tok, out = ByteTokenizer(), Recorder()
    s = TerminalStreamer(tok, file=out)
    s.put(torch.tensor([tok.encode("prompt")]))
    for i in tok.encode("Hi ") + [95, 96] + tok.encode("!"):
        s.put(torch.tensor([i]))
    s.end()
    assert out.getvalue() == "Hi é!\n"
    assert "\ufffd" not in "".join(out.writes)
    assert "é" in out.writes  # printed once its second byte arrived


def test_keeps_the_prompt_when_asked_and_is_reusable():
    tok, out = ByteTokenizer(), Recorder()
    s = TerminalStreamer(tok, skip_prompt=False, file=out)
    s.put(torch.tensor([tok.encode("Q:")]))
    s.put(torch.tensor(tok.encode("a\n")))
    s.put(torch.tensor(tok.encode("b")))
    s.end()
    s.put(torch.tensor([tok.encode("R:")]))
    s.end()
    assert out.getvalue() == "Q:a\nb\nR:\n"
    with pytest.raises(ValueError, match="batch"):
        s.put(torch.zeros(2, 3, dtype=torch.long))


def test_streams_what_generate_returns(capsys):
    _, model = make_pair("smollm2_tied")
    tok = ByteTokenizer()
    ids = torch.tensor([tok.encode("hello")])
    out = generate(model, ids, max_new_tokens=8, eos_token_id=[], streamer=TerminalStreamer(tok))
    assert capsys.readouterr().out == tok.decode(out[0, 5:].tolist()) + "\n"
