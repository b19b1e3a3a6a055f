"""Modelfiles: the tokenizer's chat template matched to a built-in's Ollama twin, stops and default system."""

import pytest

from pronghorn.data.chat_templates import CHAT_TEMPLATES, get_chat_template
from pronghorn.export.ollama import default_system_prompt, match_chat_template, ollama_modelfile


@pytest.mark.parametrize("name", ["chatml", "llama-3", "llama-3.1", "mistral", "alpaca", "zephyr", "phi-3", "gemma"])
def test_builtin_templates_get_their_own_twin(name, tiny_tokenizer):
    tok = get_chat_template(tiny_tokenizer, name, map_eos_token=False)
    match = match_chat_template(tok.chat_template, tok)
    assert match is not None and match.ollama_template == CHAT_TEMPLATES[name].ollama_template
    text = ollama_modelfile("model.Q8_0.gguf", tok)
    assert text.startswith("FROM ./model.Q8_0.gguf\n")
    assert f'TEMPLATE """{CHAT_TEMPLATES[name].ollama_template}"""' in text
    for stop in CHAT_TEMPLATES[name].stop:
        assert f"PARAMETER stop {stop!r}".replace("'", '"') in text or f'PARAMETER stop "{stop}"' in text


def test_default_system_prompt_becomes_system(tiny_tokenizer):
    tok = get_chat_template(tiny_tokenizer, "chatml", system_message="You are terse.")
    assert default_system_prompt(tok.chat_template, tok) == "You are terse."
    assert 'SYSTEM """You are terse."""' in ollama_modelfile("m.gguf", tok)
    assert "SYSTEM" not in ollama_modelfile("m.gguf", get_chat_template(tiny_tokenizer, "chatml"))


def test_unknown_template_has_no_template_line_but_stops_on_eos(tiny_tokenizer):
    tiny_tokenizer.chat_template = "{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}"
    with pytest.warns(UserWarning, match="matches none"):
        text = ollama_modelfile("m.gguf", tiny_tokenizer)
    assert text == 'FROM ./m.gguf\nPARAMETER stop "<|im_end|>"\n'
