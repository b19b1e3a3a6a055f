"""add_new_tokens: mean-initialised rows (a tied table once), the tables then train, and the tokens survive the
adapter (pronghorn and PEFT), the merged checkpoint (transformers) and the GGUF (its vocabulary and weights)."""

import json

import peft
import pytest
import torch
from helpers import make_pair
from transformers import AutoModelForCausalLM

from pronghorn import FastLanguageModel, add_new_tokens
from pronghorn.errors import PronghornError
from pronghorn.models.lora import LoRAConfig, attach_lora
from pronghorn.models.vocab import resize_vocab

NEW = ["<think>", "<|answer|>"]


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_new_tokens_round_trip_through_adapter_peft_merged_and_gguf(tiny_smollm2_dir, tmp_path, capsys):
    model, tok = FastLanguageModel.from_pretrained(str(tiny_smollm2_dir), dtype=torch.float32, device="cpu")
    old = model.model.embed_tokens.weight.detach().clone()
    n = old.shape[0]
    assert add_new_tokens(model, tok, NEW) == 2 and add_new_tokens(model, tok, NEW[:1]) == 0
    table = model.model.embed_tokens.weight
    assert table.shape[0] == n + 2 == len(tok) and model.config.vocab_size == n + 2
    assert model.lm_head.weight is table  # tied: resized once
    assert torch.equal(table[:n], old) and torch.equal(table[n:], old.mean(0).expand(2, -1))
    assert tok.convert_tokens_to_ids(NEW) == [n, n + 1]

    model = FastLanguageModel.get_peft_model(model, r=4, target_modules=["q_proj", "v_proj"],
                                             use_gradient_checkpointing=False)
    assert "new tokens were added" in capsys.readouterr().out  # the tables train, as in Unsloth
    assert model.lora_config.modules_to_save == ["embed_tokens", "lm_head"] and table.requires_grad
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    model.eval()
    ids = tok("a <think> b <|answer|> c", return_tensors="pt")["input_ids"]
    assert n in ids[0].tolist() and n + 1 in ids[0].tolist()
    with torch.no_grad():
        expect = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "adapter")
    tok.save_pretrained(tmp_path / "adapter")

    with torch.no_grad():  # pronghorn: the base grows to the adapter's rows, the tokenizer comes from the adapter
        reloaded, tok2 = FastLanguageModel.from_pretrained(str(tmp_path / "adapter"), dtype=torch.float32,
                                                           device="cpu")
        assert tok2.convert_tokens_to_ids(NEW) == [n, n + 1] and reloaded.config.vocab_size == n + 2
        assert torch.equal(reloaded(input_ids=ids).logits, expect)
        hf = AutoModelForCausalLM.from_pretrained(str(tiny_smollm2_dir), dtype=torch.float32).eval()
        hf.resize_token_embeddings(len(tok2))  # what PEFT users do before loading such an adapter
        via_peft = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()(input_ids=ids).logits
        assert _rel(via_peft, expect) <= 1e-5

        model.save_pretrained_merged(tmp_path / "merged", tok, dtype=torch.float32)
        assert json.loads((tmp_path / "merged" / "config.json").read_text())["vocab_size"] == n + 2
        merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32).eval()
        assert _rel(merged(input_ids=ids).logits, expect) <= 1e-5

        (gguf,) = model.save_pretrained_gguf(tmp_path / "gguf", tok, quantization_method="f32")
        from gguf import GGUFReader

        field = GGUFReader(str(gguf)).fields["tokenizer.ggml.tokens"]
        tokens = [bytes(field.parts[i]).decode() for i in field.data]
        assert len(tokens) == n + 2 and tokens[n:] == NEW
        back, _ = FastLanguageModel.from_pretrained(str(gguf), dtype=torch.float32, device="cpu")
        assert _rel(back(input_ids=ids).logits, expect) <= 1e-5


def test_untied_head_grows_by_its_own_mean_and_tables_start_training():
    _, model = make_pair("llama2")
    attach_lora(model, LoRAConfig(r=4, target_modules=["q_proj"]))
    embed, head = model.model.embed_tokens.weight.detach().clone(), model.lm_head.weight.detach().clone()

    class Tok(list):  # the two calls add_new_tokens makes of a tokenizer
        def add_tokens(self, tokens, special_tokens=False):
            self.extend(tokens)
            return len(tokens)

    tok = Tok(range(90))  # a tokenizer with fewer tokens than the table has rows (padded vocabularies)
    assert add_new_tokens(model, tok, ["<a>", "<b>", "<c>", "<d>", "<e>", "<f>", "<g>", "<h>", "<i>", "<j>"]) == 10
    assert model.model.embed_tokens.weight.shape[0] == model.lm_head.weight.shape[0] == 100
    assert torch.equal(model.model.embed_tokens.weight[90:], embed[:90].mean(0).expand(10, -1))
    assert torch.equal(model.lm_head.weight[90:], head[:90].mean(0).expand(10, -1))
    assert torch.equal(model.lm_head.weight[:90], head[:90])
    assert model.lora_config.modules_to_save == ["embed_tokens", "lm_head"]  # adapters were there: tables train now
    assert model.model.embed_tokens.weight.requires_grad and model.lm_head.weight.requires_grad
    with pytest.raises(PronghornError, match="cannot shrink"):
        resize_vocab(model, 50)
    with pytest.raises(PronghornError, match="non-empty strings"):
        add_new_tokens(model, tok, [""])
