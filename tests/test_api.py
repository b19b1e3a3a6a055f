"""The notebook API on the real SmolLM2-135M-Instruct weights, against transformers and PEFT."""

import json

import peft
import pytest
import torch
from transformers import AutoModelForCausalLM

from pronghorn import FastLanguageModel
from pronghorn.models.default_model import DEFAULT_HUB_ID

CHAT = [
    {"role": "user", "content": "What is the capital of France? Answer in one sentence."},
    {"role": "assistant", "content": "The capital of France is Paris."},
]


@pytest.fixture(scope="module")
def pair(smollm2_dir):
    ours, tok = FastLanguageModel.from_pretrained("default", dtype=torch.float32, device="cpu")
    hf = AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32).eval()
    return ours, hf, tok


def _chat_batch(tok):
    enc = tok.apply_chat_template(CHAT, return_tensors="pt", return_dict=True)
    return enc["input_ids"], enc["attention_mask"]


def test_loss_and_logits_equal_transformers(pair):
    ours, hf, tok = pair
    ids, mask = _chat_batch(tok)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, labels=ids)
        got = ours(input_ids=ids, attention_mask=mask, labels=ids)
    assert abs(got.loss.item() - ref.loss.item()) <= 1e-4
    assert ((got.logits - ref.logits).abs().max() / ref.logits.abs().max()).item() <= 1e-5


def test_32_greedy_tokens_identical(pair):
    ours, hf, tok = pair
    enc = tok.apply_chat_template([{"role": "user", "content": "Write a short story about a robot who learns to paint."}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ref = hf.generate(**enc, max_new_tokens=32, do_sample=False, pad_token_id=tok.pad_token_id)
    got = ours.generate(**enc, max_new_tokens=32)
    assert ref.shape[1] == enc["input_ids"].shape[1] + 32  # no early EOS: all 32 compared
    assert got.tolist() == ref.tolist()


@pytest.fixture(scope="module")
def default_adapter(smollm2_dir, tmp_path_factory):
    """(model on "default" with a trained-looking adapter, the adapter dir it saved)."""
    model, _ = FastLanguageModel.from_pretrained("default", dtype=torch.float32, device="cpu")
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, random_state=1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(len(n)))
    path = tmp_path_factory.mktemp("default_adapter") / "lora"
    model.save_pretrained(path)
    return model.eval(), path


def test_adapter_round_trip_with_peft(pair, smollm2_dir, default_adapter):
    _, _, tok = pair
    model, path = default_adapter
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == DEFAULT_HUB_ID  # resolvable by PEFT, vLLM, ...; not "default"
    hf = AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32).eval()  # PEFT mutates it
    ids, mask = _chat_batch(tok)
    with torch.no_grad():
        expect = model(input_ids=ids, attention_mask=mask).logits
        reloaded, _ = FastLanguageModel.from_pretrained(str(path), dtype=torch.float32, device="cpu")
        again = reloaded(input_ids=ids, attention_mask=mask).logits  # pronghorn: its local copy, no download
        via_peft = peft.PeftModel.from_pretrained(hf, path).eval()(input_ids=ids, attention_mask=mask).logits
    assert reloaded.lora_config is not None and reloaded.name_or_path == "default"
    assert torch.equal(again, expect)
    assert ((via_peft - expect).abs().max() / expect.abs().max()).item() <= 1e-5


def test_default_adapter_loads_with_auto_peft_model(pair, smollm2_dir, default_adapter, tmp_path):
    """AutoPeftModelForCausalLM resolves the recorded base as a hub id: here from a Hugging Face cache that holds
    pronghorn's local copy under that id (no network), as `huggingface-cli download` would have left it."""
    _, _, tok = pair
    model, path = default_adapter
    snapshot = tmp_path / f"models--{DEFAULT_HUB_ID.replace('/', '--')}" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for f in smollm2_dir.iterdir():
        (snapshot / f.name).symlink_to(f)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    loaded = peft.AutoPeftModelForCausalLM.from_pretrained(path, cache_dir=str(tmp_path), local_files_only=True,
                                                           dtype=torch.float32).eval()
    ids, mask = _chat_batch(tok)
    with torch.no_grad():
        expect = model(input_ids=ids, attention_mask=mask).logits
        got = loaded(input_ids=ids, attention_mask=mask).logits
    assert ((got - expect).abs().max() / expect.abs().max()).item() <= 1e-5


def test_merged_checkpoint_loads_in_transformers(pair, tmp_path):
    _, _, tok = pair
    model, _ = FastLanguageModel.from_pretrained("default", dtype=torch.float32, device="cpu")
    model = FastLanguageModel.get_peft_model(model, r=4, target_modules=["q_proj", "down_proj"])
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.02)
    model.save_pretrained_merged(tmp_path / "merged", tok, save_method="merged_16bit")
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32).eval()
    ids, mask = _chat_batch(tok)
    with torch.no_grad():
        ref = model.eval()(input_ids=ids, attention_mask=mask).logits
        got = hf(input_ids=ids, attention_mask=mask).logits
    # merged weights are stored in bf16: relative error of bf16 rounding through 30 layers
    assert ((got - ref).abs().max() / ref.abs().max()).item() <= 3e-2
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9


def test_get_peft_model_matches_unsloth_signature(pair):
    model, _ = FastLanguageModel.from_pretrained("default", dtype=torch.float32, device="cpu")
    model = FastLanguageModel.get_peft_model(model, r=16, target_modules=["q_proj", "v_proj"], lora_alpha=32,
                                             lora_dropout=0, bias="none", use_gradient_checkpointing="unsloth",
                                             random_state=3407, use_rslora=True, loftq_config=None)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert len(trainable) == 2 * 2 * 30
    assert model.model.gradient_checkpointing
    ids, mask = _chat_batch(pair[2])
    model.train()
    model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)
