"""Built-in chat templates: exact renderings, get_chat_template on the real SmolLM2 tokenizer, masks on the
KTO demo conversations, and the Jinja sandbox."""

from __future__ import annotations

import copy
import json
import warnings

import jinja2
import pytest

from pronghorn.data import IGNORE_INDEX, tokenize_record
from pronghorn.data.chat_templates import (
    CHAT_TEMPLATES,
    ChatTemplate,
    get_chat_template,
    list_chat_templates,
    render_chat,
)

SYS = [{"role": "system", "content": "Be brief."}]
TWO_TURNS = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
]
L31_HEAD = (
    "<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
)
QWEN_SYS = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
ALPACA_SYS = "Below is an instruction that describes a task. Write a response that appropriately completes the request."

# name -> (no system, with system, first 3 messages (no system) + add_generation_prompt); bos "<s>", eos "</s>"
EXPECTED = {
    "chatml": (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n",
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!"
        "<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n",
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n",
    ),
    "llama-3": (
        "<s><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>"
        "\n\nHello!<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n4<|eot_id|>",
        "<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>"
        "\n\nHello!<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n4<|eot_id|>",
        "<s><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>"
        "\n\nHello!<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
    ),
    "llama-3.1": (
        "<s>" + L31_HEAD + "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|><|start_header_id|>user<|end_header_id|>"
        "\n\n2+2?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n4<|eot_id|>",
        "<s>" + L31_HEAD + "Be brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|><|start_header_id|>user<|end_header_id|>"
        "\n\n2+2?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n4<|eot_id|>",
        "<s>" + L31_HEAD + "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|><|start_header_id|>user<|end_header_id|>"
        "\n\n2+2?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
    ),
    "mistral": (
        "<s>[INST] Hi [/INST] Hello!</s>[INST] 2+2? [/INST] 4</s>",
        "<s>[INST] Be brief.\n\nHi [/INST] Hello!</s>[INST] 2+2? [/INST] 4</s>",
        "<s>[INST] Hi [/INST] Hello!</s>[INST] 2+2? [/INST]",
    ),
    "alpaca": (
        "<s>" + ALPACA_SYS + "\n\n### Instruction:\nHi\n\n### Response:\nHello!</s>"
        "\n\n### Instruction:\n2+2?\n\n### Response:\n4</s>",
        "<s>Be brief.\n\n### Instruction:\nHi\n\n### Response:\nHello!</s>"
        "\n\n### Instruction:\n2+2?\n\n### Response:\n4</s>",
        "<s>" + ALPACA_SYS + "\n\n### Instruction:\nHi\n\n### Response:\nHello!</s>"
        "\n\n### Instruction:\n2+2?\n\n### Response:\n",
    ),
    "zephyr": (
        "<|user|>\nHi</s>\n<|assistant|>\nHello!</s>\n<|user|>\n2+2?</s>\n<|assistant|>\n4</s>\n",
        "<|system|>\nBe brief.</s>\n<|user|>\nHi</s>\n<|assistant|>\nHello!</s>\n<|user|>\n2+2?</s>\n"
        "<|assistant|>\n4</s>\n",
        "<|user|>\nHi</s>\n<|assistant|>\nHello!</s>\n<|user|>\n2+2?</s>\n<|assistant|>\n",
    ),
    "qwen-2.5": (
        "<|im_start|>system\n" + QWEN_SYS + "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        "Hello!<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n",
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!"
        "<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n",
        "<|im_start|>system\n" + QWEN_SYS + "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        "Hello!<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n",
    ),
    "phi-3": (  # a conversation without a generation prompt ends with eos_token, as Phi-3.5's own template
        "<|user|>\nHi<|end|>\n<|assistant|>\nHello!<|end|>\n<|user|>\n2+2?<|end|>\n<|assistant|>\n4<|end|>\n</s>",
        "<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\nHello!<|end|>\n<|user|>\n2+2?<|end|>\n"
        "<|assistant|>\n4<|end|>\n</s>",
        "<|user|>\nHi<|end|>\n<|assistant|>\nHello!<|end|>\n<|user|>\n2+2?<|end|>\n<|assistant|>\n",
    ),
    "phi-4-mini": (
        "<|user|>Hi<|end|><|assistant|>Hello!<|end|><|user|>2+2?<|end|><|assistant|>4<|end|></s>",
        "<|system|>Be brief.<|end|><|user|>Hi<|end|><|assistant|>Hello!<|end|><|user|>2+2?<|end|><|assistant|>4<|end|></s>",
        "<|user|>Hi<|end|><|assistant|>Hello!<|end|><|user|>2+2?<|end|><|assistant|>",
    ),
    "phi-4": (
        "<|im_start|>user<|im_sep|>Hi<|im_end|><|im_start|>assistant<|im_sep|>Hello!<|im_end|>"
        "<|im_start|>user<|im_sep|>2+2?<|im_end|><|im_start|>assistant<|im_sep|>4<|im_end|>",
        "<|im_start|>system<|im_sep|>Be brief.<|im_end|><|im_start|>user<|im_sep|>Hi<|im_end|>"
        "<|im_start|>assistant<|im_sep|>Hello!<|im_end|><|im_start|>user<|im_sep|>2+2?<|im_end|>"
        "<|im_start|>assistant<|im_sep|>4<|im_end|>",
        "<|im_start|>user<|im_sep|>Hi<|im_end|><|im_start|>assistant<|im_sep|>Hello!<|im_end|>"
        "<|im_start|>user<|im_sep|>2+2?<|im_end|><|im_start|>assistant<|im_sep|>",
    ),
    "gemma": (
        "<s><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\n2+2?<end_of_turn>\n<start_of_turn>model\n4<end_of_turn>\n",
        "<s><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\n2+2?<end_of_turn>\n<start_of_turn>model\n4<end_of_turn>\n",
        "<s><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\n2+2?<end_of_turn>\n<start_of_turn>model\n",
    ),
}

# what precedes an assistant reply's content inside its trained span (Mistral puts a space after [/INST])
REPLY_PREFIX = {"mistral": " "}


def test_every_builtin_has_an_expected_rendering():
    assert sorted(EXPECTED) == sorted(list_chat_templates())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_exact_rendering(name):
    plain, with_system, generation = EXPECTED[name]
    kw = {"bos_token": "<s>", "eos_token": "</s>"}
    assert render_chat(TWO_TURNS, name, **kw) == plain
    assert render_chat(SYS + TWO_TURNS, name, **kw) == with_system
    assert render_chat(TWO_TURNS[:3], name, add_generation_prompt=True, **kw) == generation


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_transformers_renders_the_same(name, smollm2_tokenizer):
    t = CHAT_TEMPLATES[name]
    for msgs, gen in ((TWO_TURNS, False), (SYS + TWO_TURNS, False), (TWO_TURNS[:3], True)):
        ours = render_chat(msgs, t, add_generation_prompt=gen, bos_token="<|im_start|>", eos_token="<|im_end|>")
        theirs = smollm2_tokenizer.apply_chat_template(msgs, chat_template=t.jinja, add_generation_prompt=gen, tokenize=False)
        assert ours == theirs


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_template_metadata(name):
    t = CHAT_TEMPLATES[name]
    assert isinstance(t, ChatTemplate) and t.name == name
    assert t.stop and all(isinstance(s, str) and s for s in t.stop)
    if t.eos_token is not None:
        assert t.eos_token in t.stop
        assert t.eos_token in EXPECTED[name][0]
    assert ".Messages" in t.ollama_template or ".Prompt" in t.ollama_template
    assert t.ollama_template.count("{{") == t.ollama_template.count("}}")
    assert t.response_part in EXPECTED[name][2] and t.instruction_part in EXPECTED[name][0]
    modelfile = t.ollama_modelfile("./model.gguf")
    assert modelfile.startswith("FROM ./model.gguf\nTEMPLATE \"\"\"")
    assert modelfile.count("PARAMETER stop") == len(t.stop)


def test_system_message_override():
    t = CHAT_TEMPLATES["qwen-2.5"].with_system("You are terse.")
    out = render_chat(TWO_TURNS[:1], t, add_generation_prompt=True)
    assert out == "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    # an explicit system message still wins
    assert render_chat(SYS + TWO_TURNS[:1], t).startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert t.default_system == "You are terse."
    # a default system prompt on a template that has none by default
    llama = CHAT_TEMPLATES["llama-3"].with_system('Say "hi".')
    assert render_chat(TWO_TURNS[:1], llama).startswith('<|start_header_id|>system<|end_header_id|>\n\nSay "hi".')


def test_role_errors():
    with pytest.raises(jinja2.TemplateError, match="alternate"):
        render_chat([{"role": "assistant", "content": "x"}], "mistral")
    with pytest.raises(jinja2.TemplateError, match="supports only"):
        render_chat([{"role": "tool", "content": "x"}], "zephyr")


def test_unknown_name_lists_builtins(smollm2_tokenizer):
    with pytest.raises(ValueError, match="unknown chat template 'vicuna'.*chatml.*llama-3.1.*gemma"):
        get_chat_template(smollm2_tokenizer, "vicuna")
    with pytest.warns(UserWarning):
        tok = get_chat_template(copy.deepcopy(smollm2_tokenizer), "Llama_3.1")
    assert tok.chat_template == CHAT_TEMPLATES["llama-3.1"].jinja


def test_sandbox_blocks_python_internals():
    evil = [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ messages.__class__.__mro__ }}",
        "{{ raise_exception.__globals__ }}",
        "{% set x = messages.append({'role': 'user'}) %}",  # immutable: no mutation of the caller's data
    ]
    for src in evil:
        with pytest.raises(jinja2.exceptions.SecurityError):
            render_chat(TWO_TURNS, src)
    assert render_chat(TWO_TURNS, "{{ messages | length }} {{ messages[0] | tojson }}") == (
        '4 {"role": "user", "content": "Hi"}'
    )


def test_get_chat_template_sets_template_and_eos(smollm2_tokenizer):
    tok = copy.deepcopy(smollm2_tokenizer)
    n = len(tok)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # <|im_end|> exists: nothing added, no warning
        assert get_chat_template(tok, "chatml") is tok
    assert tok.chat_template == CHAT_TEMPLATES["chatml"].jinja and tok.eos_token == "<|im_end|>" and len(tok) == n

    with pytest.warns(UserWarning, match="embedding .* must grow"):
        get_chat_template(tok, "llama-3.1", system_message="Be kind.")
    assert len(tok) == n + 1 and tok.eos_token == "<|eot_id|>"
    assert tok.convert_tokens_to_ids("<|eot_id|>") == n and tok.eos_token_id == n
    assert "Be kind." in tok.chat_template
    # the session fixture is untouched
    assert len(smollm2_tokenizer) == n and smollm2_tokenizer.eos_token == "<|im_end|>"
    assert smollm2_tokenizer.chat_template != tok.chat_template

    # map_eos_token=False only sets the template; alpaca keeps the tokenizer's own EOS
    tok2 = copy.deepcopy(smollm2_tokenizer)
    get_chat_template(tok2, "gemma", map_eos_token=False)
    assert len(tok2) == n and tok2.eos_token == "<|im_end|>"
    get_chat_template(tok2, "alpaca")
    assert len(tok2) == n and tok2.eos_token == "<|im_end|>"


def test_get_chat_template_error_when_token_cannot_be_added():
    class NoAdd:
        all_special_tokens: list = []
        eos_token = None

    with pytest.raises(ValueError, match="cannot add special tokens"):
        get_chat_template(NoAdd(), "phi-3")


@pytest.mark.parametrize("name", ["chatml", "llama-3.1", "mistral", "zephyr", "phi-3", "phi-4-mini", "phi-4", "gemma"])
def test_kto_masks_train_replies_and_end_of_turn(name, smollm2_tokenizer, data_dir):
    rows = json.loads((data_dir / "llamafactory-demo" / "kto_en_demo.json").read_text())[:60]
    tok = copy.deepcopy(smollm2_tokenizer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        template = get_chat_template(tok, name).chat_template
    eot = CHAT_TEMPLATES[name].eos_token
    assert len(tok.encode(eot, add_special_tokens=False)) == 1
    for i, row in enumerate(rows):
        out = tokenize_record({"messages": row["messages"]}, tok, max_length=None, chat_template=template)
        ids, labels = out["input_ids"], out["labels"]
        # contiguous trained runs, decoded
        runs, cur = [], []
        for t, (tid, lab) in enumerate(zip(ids, labels)):
            if lab != IGNORE_INDEX:
                assert lab == tid
                cur.append(tid)
            elif cur:
                runs.append(cur)
                cur = []
        if cur:
            runs.append(cur)
        got = [tok.decode(r, skip_special_tokens=False, clean_up_tokenization_spaces=False) for r in runs]
        want = [REPLY_PREFIX.get(name, "") + m["content"] + eot for m in row["messages"] if m["role"] == "assistant"]
        assert got == want, f"row {i}"


@pytest.mark.parametrize("name", ["llama-3", "gemma", "phi-3"])
def test_a_base_without_the_markers_gets_them_as_new_tokens(tiny_smollm2_dir, name):
    """Issue 17 item 2: asking for a template whose turn markers the base's tokenizer lacks (SmolLM2 has ChatML's,
    not Llama 3's, Gemma's or Phi's) with ``model=`` adds them as special tokens: each encodes to one new id,
    the embedding grows to the tokenizer (new rows the mean of the others) and the tables train."""
    import torch
    import transformers

    from pronghorn import FastLanguageModel

    model, tok = FastLanguageModel.from_pretrained(str(tiny_smollm2_dir), dtype=torch.float32)
    template = CHAT_TEMPLATES[name]
    before, mean = len(tok), model.get_input_embeddings().weight.detach().mean(0)
    assert not any(m in tok.get_vocab() for m in template.special_tokens)
    get_chat_template(tok, name, model=model)
    assert len(tok) == before + len(template.special_tokens)
    table = model.get_input_embeddings().weight
    assert table.shape[0] == len(tok) and model.config.vocab_size == len(tok)
    ids = tok(render_chat(SYS + TWO_TURNS, tok.chat_template), add_special_tokens=False).input_ids
    for marker in template.special_tokens:
        (new_id,) = tok.encode(marker, add_special_tokens=False)
        assert new_id >= before and new_id in ids
        torch.testing.assert_close(table[new_id].detach(), mean)
    assert tok.eos_token == template.eos_token and model.needs_embedding_training
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8)
    assert table.requires_grad or model.get_input_embeddings().weight.requires_grad
    assert isinstance(tok, transformers.PreTrainedTokenizerBase)


def test_markers_already_there_add_nothing(tiny_smollm2_dir):
    import torch

    from pronghorn import FastLanguageModel

    model, tok = FastLanguageModel.from_pretrained(str(tiny_smollm2_dir), dtype=torch.float32)
    rows = model.get_input_embeddings().weight.shape[0]
    get_chat_template(tok, "chatml", model=model)
    assert model.get_input_embeddings().weight.shape[0] == rows
    assert not getattr(model, "needs_embedding_training", False)
