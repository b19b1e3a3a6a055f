"""Merged exports keep the fine-tune: in float32 the merged model's loss is base + adapter's; in bf16 a small
adapter is partly rounded away, and the export says so (export/merge_rounding.py); a large one is not warned about.

The base weights are rounded to bf16 first, as a bf16 hub checkpoint loaded in fp32 is, so that only the adapter's
precision is at stake."""

import warnings

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from pronghorn import FastLanguageModel
from pronghorn.cli import main
from pronghorn.export.merge_rounding import ROUNDING_LIMIT, rounding_effect

ROWS = ["Question: what is 12 times 3? Answer: 36, since 12 + 12 + 12 = 36.",
        "The river runs past the mill; in spring the water rises over the stones.",
        "Name three colours: red, green and blue."]


def _model(checkpoint_dir, b_scale: float):
    """fp32 model with bf16-representable base weights and LoRA B ~ N(0, b_scale)."""
    model, tok = FastLanguageModel.from_pretrained(str(checkpoint_dir), dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=g) * b_scale)
    return model.eval(), tok


def _batch(tok):
    enc = tok(ROWS, return_tensors="pt", padding=True)
    return enc, enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)


@torch.no_grad()
def _loss_and_logits(model, tok):
    enc, labels = _batch(tok)
    out = model(**enc, labels=labels)
    real = enc["attention_mask"].bool()
    return out.loss.item(), out.logits[real].float()


def _base_adapter_merged(model, tok, out_dir, **save):
    with model.disable_adapter():
        base = _loss_and_logits(model, tok)
    adapter = _loss_and_logits(model, tok)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.save_pretrained_merged(out_dir, tok, **save)
    merged = AutoModelForCausalLM.from_pretrained(str(out_dir), dtype=torch.float32).eval()
    rounding_warnings = [w for w in caught if "keeps only part of the fine-tune" in str(w.message)]
    return base, adapter, _loss_and_logits(merged, tok), rounding_warnings


def test_float32_merge_has_the_adapter_loss(tiny_smollm2_dir, tmp_path):
    model, tok = _model(tiny_smollm2_dir, b_scale=1e-2)
    (base_loss, _), (adapter_loss, adapter_logits), (loss, logits), warned = _base_adapter_merged(
        model, tok, tmp_path / "m", dtype=torch.float32)
    assert not warned
    assert abs(adapter_loss - base_loss) > 1e-3  # the adapter changes the loss ...
    assert loss == pytest.approx(adapter_loss, rel=1e-6)  # ... and the fp32 merge keeps it
    torch.testing.assert_close(logits, adapter_logits, rtol=1e-5, atol=1e-5 * float(adapter_logits.abs().max()))
    with safe_open(str(tmp_path / "m" / "model.safetensors"), framework="pt") as st:
        assert {st.get_slice(k).get_dtype() for k in st.keys()} == {"F32"}


def test_bf16_merge_warns_when_it_rounds_a_small_adapter_away(tiny_smollm2_dir, tmp_path):
    model, tok = _model(tiny_smollm2_dir, b_scale=1e-4)  # moves weights by less than bf16's spacing
    assert rounding_effect(model, torch.float32) < 1e-3
    assert rounding_effect(model, torch.bfloat16) > 3 * ROUNDING_LIMIT
    (_, base_logits), (_, adapter_logits), (_, logits), warned = _base_adapter_merged(model, tok, tmp_path / "m")
    assert len(warned) == 1 and "dtype=torch.float32 (CLI: --dtype float32)" in str(warned[0].message)
    # the merged model's outputs really lost a good part of what the adapter changed
    assert (logits - adapter_logits).norm() > ROUNDING_LIMIT * (adapter_logits - base_logits).norm()


def test_bf16_merge_of_a_large_adapter_is_not_warned_about(tiny_smollm2_dir, tmp_path):
    model, tok = _model(tiny_smollm2_dir, b_scale=1e-2)
    assert rounding_effect(model, torch.bfloat16) < ROUNDING_LIMIT
    (_, base_logits), (_, adapter_logits), (_, logits), warned = _base_adapter_merged(model, tok, tmp_path / "m")
    assert not warned
    assert (logits - adapter_logits).norm() < ROUNDING_LIMIT * (adapter_logits - base_logits).norm()


def test_no_adapter_or_an_unchanged_one_is_not_measured(tiny_smollm2_dir):
    model, tok = _model(tiny_smollm2_dir, b_scale=0.0)
    assert rounding_effect(model, torch.bfloat16) is None  # B = 0: nothing to lose
    plain, tok = FastLanguageModel.from_pretrained(str(tiny_smollm2_dir), dtype=torch.float32)
    assert rounding_effect(plain, torch.bfloat16) is None


def test_cli_dtype_float32(tiny_smollm2_dir, tmp_path, capsys):
    model, tok = _model(tiny_smollm2_dir, b_scale=1e-4)
    model.save_pretrained(tmp_path / "adapter")
    out = tmp_path / "merged"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # float32: no rounding warning
        assert main(["export", "--model", str(tiny_smollm2_dir), "--adapter", str(tmp_path / "adapter"),
                     "--format", "merged", "--dtype", "float32", "--out", str(out)]) == 0
    with safe_open(str(out / "model.safetensors"), framework="pt") as st:
        assert {st.get_slice(k).get_dtype() for k in st.keys()} == {"F32"}
    for flags, culprit in ((["--format", "gguf", "--dtype", "float32"], "--dtype applies to --format merged"),
                           (["--format", "lora", "--max-shard-size", "1GB"], "--max-shard-size applies to"),
                           (["--format", "lora", "--base-checkpoint", "x"], "--base-checkpoint applies to")):
        assert main(["export", "--out", str(tmp_path / "no"), *flags]) == 2
        assert culprit in capsys.readouterr().err
    assert not (tmp_path / "no").exists()
