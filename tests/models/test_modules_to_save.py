"""embed_tokens / lm_head trained fully beside the adapters: one parameter when tied, saved as PEFT's
modules_to_save, loaded by PEFT on transformers and by pronghorn with equal logits, merged into the export."""

import json

import peft
import pytest
import torch
from helpers import make_pair
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from pronghorn import FastLanguageModel
from pronghorn.errors import CheckpointError, PronghornError
from pronghorn.export.adapter import save_adapter
from pronghorn.models.adapter_format import load_adapter, read_adapter_config
from pronghorn.models.lora import LoRAConfig, attach_lora, set_lora_enabled, trainable_parameters

TARGETS = ["q_proj", "v_proj", "embed_tokens", "lm_head"]


def _perturb(model, seed=0):
    """Trained-looking weights: random LoRA B and a changed table / head."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.05)


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("name", ["llama2", "smollm2_tied", "gemma", "gemma2"])
def test_tables_train_once_and_round_trip_through_peft(name, tmp_path):
    _, model = make_pair(name)
    attach_lora(model, LoRAConfig(r=4, lora_alpha=8, target_modules=TARGETS), seed=3)
    tied = model.config.tie_word_embeddings
    table, head = model.model.embed_tokens.weight, model.lm_head.weight
    assert table.requires_grad and head.requires_grad and (table is head) == tied
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert trainable_parameters(model)[0] == lora + table.numel() * (1 if tied else 2)  # a tied table counted once
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids, labels=ids).loss.backward()
    assert table.grad is not None and head.grad is not None and table.grad.abs().sum() > 0
    _perturb(model)
    save_adapter(model, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["q_proj", "v_proj"]
    assert config["modules_to_save"] == ["embed_tokens", "lm_head"] and config["ensure_weight_tying"] == tied
    keys = set(load_file(str(tmp_path / "a" / "adapter_model.safetensors")))
    assert {"base_model.model.model.embed_tokens.weight", "base_model.model.lm_head.weight"} <= keys
    with torch.no_grad():
        expect = model(input_ids=ids).logits
        hf, fresh = make_pair(name)
        via_peft = peft.PeftModel.from_pretrained(hf, tmp_path / "a").eval()(input_ids=ids).logits
        again = load_adapter(fresh, tmp_path / "a")(input_ids=ids).logits
    assert _rel(via_peft, expect) <= 1e-5
    assert torch.equal(again, expect)
    assert (fresh.model.embed_tokens.weight is fresh.lm_head.weight) == tied


def test_adapter_saved_by_peft_loads_in_pronghorn(tmp_path):
    hf, ours = make_pair("llama2")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], modules_to_save=["embed_tokens", "lm_head"])
    pm = peft.get_peft_model(hf, cfg)
    _perturb(pm, seed=4)
    pm.save_pretrained(tmp_path / "p")
    ids = torch.arange(3, 14)[None]
    with torch.no_grad():
        expect = pm.eval()(input_ids=ids).logits
        got = load_adapter(ours, tmp_path / "p")(input_ids=ids).logits
    assert ours.lora_config.modules_to_save == ["embed_tokens", "lm_head"]
    assert _rel(got, expect) <= 1e-5


def test_notebook_api_reload_and_merged_export(tiny_smollm2_dir, tmp_path):
    """get_peft_model(target_modules=[..., embed_tokens, lm_head]) on a tied model; from_pretrained(adapter_dir)
    restores the table; the merged checkpoint carries it and loads in transformers with equal logits."""
    model, tok = FastLanguageModel.from_pretrained(str(tiny_smollm2_dir), dtype=torch.float32, device="cpu")
    model = FastLanguageModel.get_peft_model(model, r=4, target_modules=TARGETS, use_gradient_checkpointing=False)
    _perturb(model, seed=2)
    model.eval()
    model.save_pretrained(tmp_path / "adapter")
    ids = tok("The table trains too.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expect = model(input_ids=ids).logits
        reloaded, _ = FastLanguageModel.from_pretrained(str(tmp_path / "adapter"), dtype=torch.float32, device="cpu")
        assert reloaded.lora_config.modules_to_save == ["embed_tokens", "lm_head"]
        assert torch.equal(reloaded(input_ids=ids).logits, expect)
        model.save_pretrained_merged(tmp_path / "merged", tok, dtype=torch.float32)
        hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32).eval()
        assert _rel(hf(input_ids=ids).logits, expect) <= 1e-5


def test_qlora_keeps_the_tables_16_bit(tiny_smollm2_dir):
    model, _ = FastLanguageModel.from_pretrained(str(tiny_smollm2_dir), load_in_4bit=True, dtype=torch.bfloat16,
                                                 device="cpu")
    model = FastLanguageModel.get_peft_model(model, r=4, target_modules=TARGETS, use_gradient_checkpointing=False)
    table = model.model.embed_tokens.weight
    assert type(table) is torch.nn.Parameter and table.dtype == torch.bfloat16 and table.requires_grad
    assert model.model.layers[0].self_attn.q_proj.is_quantized
    ids = torch.arange(5, 17)[None]
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    assert table.grad is not None and table.grad.dtype == torch.bfloat16 and table.grad.abs().sum() > 0


def test_unsupported_modules_and_switching_off_are_clear_errors(tmp_path):
    with pytest.raises(PronghornError, match=r"\['norm'\] not supported.*embed_tokens"):
        LoRAConfig(target_modules=["q_proj", "norm"])
    with pytest.raises(PronghornError, match="names no projection"):
        LoRAConfig(target_modules=["embed_tokens"])
    _, model = make_pair("llama2")
    attach_lora(model, LoRAConfig(r=4, target_modules=TARGETS))
    with pytest.raises(PronghornError, match="cannot be switched off.*embed_tokens"):
        set_lora_enabled(model, False)
    save_adapter(model, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**config, "modules_to_save": ["model.norm"]}))
    with pytest.raises(CheckpointError, match=r"adapter_config.json.*\['norm'\] not supported"):
        read_adapter_config(tmp_path / "a")


def test_tied_adapter_training_the_halves_apart_is_refused(tmp_path):
    """PEFT without ensure_weight_tying trains a copy of the tied embedding apart from the head: pronghorn keeps
    one table and says so instead of loading something else."""
    hf, ours = make_pair("smollm2_tied")
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["embed_tokens"]))
    _perturb(pm, seed=5)
    pm.save_pretrained(tmp_path / "p")
    with pytest.raises(CheckpointError, match="apart from the table it is tied to.*ensure_weight_tying"):
        load_adapter(ours, tmp_path / "p")
