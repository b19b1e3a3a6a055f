"""Modelfiles: the tokenizer's chat template matched to a built-in's Ollama twin, stops and default system."""

import pytest

import chat_reference as ref

from pronghorn.data.chat_templates import CHAT_TEMPLATES, get_chat_template
from pronghorn.export.ollama import default_system_prompt, match_chat_template, ollama_modelfile


@pytest.mark.parametrize("name", ["chatml", "llama-3", "llama-3.1", "mistral", "alpaca", "zephyr", "phi-3", "phi-4-mini",
                                  "phi-4", "gemma"])
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


@pytest.mark.parametrize("own,eos,name", [(ref.GEMMA2_IT, "<eos>", "gemma"), (ref.GEMMA3_IT, "<eos>", "gemma"),
                                          (ref.PHI35_MINI, "<|endoftext|>", "phi-3"),
                                          (ref.PHI4_MINI, "<|endoftext|>", "phi-4-mini"), (ref.PHI4, "<|im_end|>", "phi-4")])
def test_a_models_own_template_gets_its_familys_twin(own, eos, name, tiny_tokenizer):
    """Gemma 2 / 3's and Phi's own templates (tests/chat_reference.py) are matched to the family's built-in."""
    tiny_tokenizer.chat_template, tiny_tokenizer.eos_token = own, eos
    assert match_chat_template(own, tiny_tokenizer, first=name).name == name
    text = ollama_modelfile("m.gguf", tiny_tokenizer, name)
    assert f'TEMPLATE """{CHAT_TEMPLATES[name].ollama_template}"""' in text and f'PARAMETER stop "{eos}"' in text


def test_a_tokenizer_without_template_gets_the_familys(tmp_path, tiny_tokenizer):
    """save_gguf writes the Modelfile with the model family's template (FamilySpec.chat_template) when the
    tokenizer has none; a tokenizer's own template still wins."""
    from helpers import make_pair
    from pronghorn.export.gguf_writer import save_gguf

    _, model = make_pair("phi3_gguf")
    tiny_tokenizer.chat_template = None
    with pytest.warns(UserWarning, match="model family's \\('phi-3'\\)"):
        save_gguf(model, tmp_path / "p", tiny_tokenizer, "f32")
    assert f'TEMPLATE """{CHAT_TEMPLATES["phi-3"].ollama_template}"""' in (tmp_path / "p" / "Modelfile").read_text()
    get_chat_template(tiny_tokenizer, "chatml", map_eos_token=False)
    save_gguf(model, tmp_path / "c", tiny_tokenizer, "f32")
    assert f'TEMPLATE """{CHAT_TEMPLATES["chatml"].ollama_template}"""' in (tmp_path / "c" / "Modelfile").read_text()
