"""``pronghorn train --full-finetuning`` on the default model (SmolLM2-135M-Instruct), 2 steps on the CPU: every
weight trains and the output directory is a Hugging Face checkpoint that transformers loads, with the logits of
pronghorn's own load of it; a YAML recipe says the same with ``full_finetuning: true``."""

from __future__ import annotations

import json

import torch
import transformers

from pronghorn import FastLanguageModel
from pronghorn.cli import main
from pronghorn.train.config import TrainConfig

ROWS = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                      {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]} for i in range(4)]


def test_full_finetuning_cli_writes_a_transformers_checkpoint(smollm2_dir, tmp_path, capsys):
    data, out = tmp_path / "train.jsonl", tmp_path / "out"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    argv = ["train", "--model", str(smollm2_dir), "--data", str(data), "--output-dir", str(out), "--full-finetuning",
            "--max-steps", "2", "--batch-size", "2", "--gradient-accumulation-steps", "1", "--max-length", "48",
            "--learning-rate", "1e-4", "--no-progress", "--dtype", "float32"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "full fine-tuning: 134,515,008 of 134,515,008 parameters train" in printed
    assert f"saved model to {out} after 2 steps" in printed
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert not (out / "adapter_config.json").exists()
    assert [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())] == [1, 2]
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    base = transformers.AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32)
    trained, _ = FastLanguageModel.from_pretrained(str(out), dtype=torch.float32)
    ids = torch.tensor([[1, 22, 333, 4444, 5]])
    with torch.no_grad():
        logits = hf(input_ids=ids).logits
        torch.testing.assert_close(trained(input_ids=ids).logits, logits, rtol=1e-4, atol=1e-4)
        assert (base(input_ids=ids).logits - logits).abs().max() > 1e-3  # the weights did train
    moved = [n for n, p in base.named_parameters() if not torch.equal(p, hf.get_parameter(n))]
    assert len(moved) == len(list(base.named_parameters()))  # every weight (the tied table once)


def test_full_finetuning_in_a_recipe(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("full_finetuning: true\noptim: adamw_bf16_sr\noptimizer_in_backward: true\n"
                      "gradient_accumulation_steps: 1\nmax_grad_norm: 0\n")
    cfg = TrainConfig.from_yaml(recipe)
    assert cfg.full_finetuning and cfg.optimizer_in_backward and cfg.optim == "adamw_bf16_sr"
