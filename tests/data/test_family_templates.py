"""The Gemma and Phi chat templates: they render what each model's own template (tests/chat_reference.py, from its
tokenizer_config.json) renders, and ``train_on`` masks train exactly each assistant reply and its end-of-turn
marker under either template, on multi-turn conversations with a system message (Gemma: folded into the first
user turn). Tokenizer: SmolLM2's real BPE with the family's markers added as special tokens and the family's
EOS (Phi-3.5 / Phi-4-mini: ``<|endoftext|>``, which their templates write after the last turn)."""

from __future__ import annotations

import copy

import jinja2
import pytest

import chat_reference as ref
from chat_reference import trained_runs
from pronghorn.data import tokenize_record
from pronghorn.data.chat_templates import CHAT_TEMPLATES, lookup_chat_template, render_chat
from pronghorn.errors import DataError
from pronghorn.models.families import FAMILIES

SYSTEM = {"role": "system", "content": "You answer in one line."}
TURNS = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": " It is 4. "},  # spaces: Gemma's template trims them, Phi's keep them
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "6, of course."},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": "You are welcome."},
]

# built-in name -> (the model's own template, the markers its tokenizer has as special tokens, its EOS, the
# end-of-turn marker a reply is trained with)
FAMILY = {
    "gemma": (ref.GEMMA3_IT, ["<start_of_turn>", "<end_of_turn>", "<bos>", "<eos>"], "<eos>", "<end_of_turn>"),
    "phi-3": (ref.PHI35_MINI, ["<|user|>", "<|assistant|>", "<|system|>", "<|end|>"], "<|endoftext|>", "<|end|>"),
    "phi-4-mini": (ref.PHI4_MINI, ["<|user|>", "<|assistant|>", "<|system|>", "<|end|>"], "<|endoftext|>", "<|end|>"),
    "phi-4": (ref.PHI4, ["<|im_sep|>"], "<|im_end|>", "<|im_end|>"),
}


def _conversations():
    return [SYSTEM] + TURNS, TURNS, [SYSTEM] + TURNS[:2], [{"role": "system", "content": ""}] + TURNS[:4]


@pytest.mark.parametrize("name", sorted(FAMILY))
def test_renders_what_the_models_own_template_renders(name):
    own = FAMILY[name][0]
    for conversation in _conversations():
        if name == "gemma" and conversation[0]["content"] == "":
            continue  # Gemma 3 folds even an empty system message: "\n\n" opens the first user turn, in both
        for gen in (False, True):
            msgs = conversation[:-1] if gen else conversation
            kw = dict(add_generation_prompt=gen, bos_token="<bos>", eos_token="<|endoftext|>")
            assert render_chat(msgs, name, **kw) == render_chat(msgs, own, **kw), (conversation, gen)


def test_gemma_folds_the_system_message_as_gemma_3_and_equals_gemma_2_without_one():
    kw = dict(bos_token="<bos>")
    out = render_chat([SYSTEM] + TURNS[:2], "gemma2", **kw)
    assert out == ("<bos><start_of_turn>user\nYou answer in one line.\n\nWhat is 2+2?<end_of_turn>\n"
                   "<start_of_turn>model\nIt is 4.<end_of_turn>\n")
    for gen in (False, True):
        msgs = TURNS[:5] if gen else TURNS
        assert render_chat(msgs, "gemma", add_generation_prompt=gen, **kw) == render_chat(
            msgs, ref.GEMMA2_IT, add_generation_prompt=gen, **kw)
    with pytest.raises(jinja2.TemplateError, match="System role not supported"):
        render_chat([SYSTEM] + TURNS, ref.GEMMA2_IT, **kw)  # what Gemma 2's own template does instead


def test_unsloth_names_and_family_specs():
    for alias, name in {"gemma": "gemma", "gemma2": "gemma", "gemma-3": "gemma", "gemma3": "gemma", "phi-3": "phi-3",
                        "phi-3.5": "phi-3", "phi-35": "phi-3", "phi-4": "phi-4", "phi-4-mini": "phi-4-mini"}.items():
        assert lookup_chat_template(alias) is CHAT_TEMPLATES[name]
    named = {t: lookup_chat_template(FAMILIES[t].chat_template).name for t in FAMILIES}
    assert named == {"llama": "llama-3.1", "mistral": "mistral", "qwen2": "qwen-2.5", "qwen3": "chatml",
                     "gemma": "gemma", "gemma2": "gemma", "gemma3_text": "gemma", "phi3": "phi-3"}


def _family_tokenizer(base, name):
    _, specials, eos, _ = FAMILY[name]
    tok = copy.deepcopy(base)
    tok.add_special_tokens({"additional_special_tokens": specials})
    tok.eos_token = eos
    if name == "gemma":
        tok.bos_token = "<bos>"
    return tok


def _expected(name, replies):
    end = FAMILY[name][3]
    return [(m["content"].strip() if name == "gemma" else m["content"]) + end for m in replies]


@pytest.mark.parametrize("template", ["builtin", "own"])
@pytest.mark.parametrize("name", sorted(FAMILY))
def test_masks_train_each_reply_and_its_end_of_turn_marker(name, template, smollm2_tokenizer):
    tok = _family_tokenizer(smollm2_tokenizer, name)
    tok.chat_template = CHAT_TEMPLATES[name].jinja if template == "builtin" else FAMILY[name][0]
    conversation = [SYSTEM] + TURNS
    replies = [m for m in TURNS if m["role"] == "assistant"]

    def runs(out):
        assert all(lab in (-100, i) for i, lab in zip(out["input_ids"], out["labels"]))
        return [tok.decode([out["input_ids"][t] for t in run]) for run in trained_runs(out["labels"])]

    every = tokenize_record({"messages": conversation}, tok, max_length=None)
    assert tok.decode(every["input_ids"]) == render_chat(conversation, FAMILY[name][0], bos_token=tok.bos_token,
                                                         eos_token=tok.eos_token)
    assert runs(every) == _expected(name, replies)
    last = tokenize_record({"messages": conversation}, tok, max_length=None, train_on="last_assistant")
    assert runs(last) == _expected(name, replies[-1:]) and last["input_ids"] == every["input_ids"]
    completion = tokenize_record({"prompt": conversation[:-1], "completion": conversation[-1:]}, tok, max_length=None)
    assert runs(completion) == _expected(name, replies[-1:]) and completion["input_ids"] == every["input_ids"]


def test_gemma_2s_own_template_refuses_a_system_message_clearly(smollm2_tokenizer):
    """With Gemma 2's own template a system message is an error naming the row (fold it, or use "gemma")."""
    tok = _family_tokenizer(smollm2_tokenizer, "gemma")
    tok.chat_template = ref.GEMMA2_IT
    with pytest.raises(DataError, match="System role not supported"):
        tokenize_record({"messages": [SYSTEM] + TURNS}, tok, max_length=None)
    ours = tokenize_record({"messages": TURNS}, tok, max_length=None)
    tok.chat_template = CHAT_TEMPLATES["gemma"].jinja
    assert tokenize_record({"messages": TURNS}, tok, max_length=None) == ours


@pytest.mark.parametrize("name", sorted(FAMILY))
def test_train_on_responses_only_equals_the_offset_masks(name, smollm2_tokenizer):
    """Unsloth's helper (a character search for the template's parts) masks as tokenize_record does, the EOS that
    Phi's templates write after the last turn included (masked: it follows the turn's <|end|>)."""
    from pronghorn.data.chat_templates import train_on_responses_only

    tok = _family_tokenizer(smollm2_tokenizer, name)
    tok.chat_template = CHAT_TEMPLATES[name].jinja
    rows = [tokenize_record({"messages": m}, tok, max_length=None) for m in ([SYSTEM] + TURNS, TURNS[:2])]
    out = train_on_responses_only([{"input_ids": r["input_ids"]} for r in rows], tokenizer=tok)
    assert [r["labels"] for r in out] == [r["labels"] for r in rows]
