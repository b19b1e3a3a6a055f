"""``pronghorn chat`` keeps the conversation: every turn's prompt is the chat template over the whole history
(scripted --prompt turns and interactive input alike); /reset forgets it. Real SmolLM2 model and template."""

import builtins

import pytest

from pronghorn.api import FastLanguageModel
from pronghorn.causal_lm import PronghornForCausalLM
from pronghorn.cli import main


@pytest.fixture
def prompts(smollm2_fp32, monkeypatch):
    """The decoded prompt of every generate() call the CLI makes (the model is loaded once per session)."""
    model, tok = smollm2_fp32
    seen = []
    original = PronghornForCausalLM.generate

    def recording(self, input_ids=None, attention_mask=None, **kw):
        seen.append(tok.decode(input_ids[0]))
        return original(self, input_ids, attention_mask, **kw)

    monkeypatch.setattr(PronghornForCausalLM, "generate", recording)
    monkeypatch.setattr(FastLanguageModel, "from_pretrained", staticmethod(lambda *a, **k: (model, tok)))
    return seen


def _turn(text):
    return f"<|im_start|>user\n{text}<|im_end|>"


def test_scripted_turns_share_the_history(prompts, capsys):
    assert main(["chat", "--system", "Be brief.", "--prompt", "My name is Ada.", "--prompt", "What is my name?",
                 "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert ">>> My name is Ada." in out and ">>> What is my name?" in out
    first, second = prompts
    assert "Be brief." in first and _turn("My name is Ada.") in first and "What is my name?" not in first
    assert second.startswith(first)  # the first prompt, then the reply, then the new question
    reply = second[len(first):].split("<|im_end|>")[0].strip()
    assert reply and reply in out
    assert second.endswith(_turn("What is my name?") + "\n<|im_start|>assistant\n")


def test_interactive_history_and_reset(prompts, monkeypatch, capsys):
    lines = iter(["Hello there", "", "Second", "/reset", "Third", "/exit"])
    monkeypatch.setattr(builtins, "input", lambda prompt="": next(lines))
    assert main(["chat", "--max-new-tokens", "3"]) == 0
    first, second, third = prompts
    assert _turn("Hello there") in second and _turn("Second") in second
    assert "Hello there" not in third and "Second" not in third and _turn("Third") in third
