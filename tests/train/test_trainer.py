"""The native training loop: exact gradient accumulation, exact resume, outputs on disk, bad input."""

import json

import pytest
import torch

from helpers import random_examples, tiny_lora_model
from pronghorn.errors import OutputExistsError, PronghornError
from pronghorn.train.config import TrainConfig
from pronghorn.train.trainer import Trainer


def _trainer(tmp_path, tok, examples, dtype=torch.float32, **kw):
    cfg = TrainConfig(output_dir=str(tmp_path), progress=False, **kw)
    return Trainer(tiny_lora_model(kw.get("lora_dropout", 0.0), dtype), tok, examples, cfg, base_name="tiny")


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 3e-5)])
def test_accumulation_equals_one_big_batch(tmp_path, smollm2_tokenizer, dtype, tol):
    """fp64 shows the algebra is exact; fp32 differs only by summation order (tolerance relative to the
    tensor's largest gradient)."""
    examples = random_examples(8)
    big = _trainer(tmp_path / "a", smollm2_tokenizer, examples, dtype, batch_size=8, gradient_accumulation_steps=1)
    small = _trainer(tmp_path / "b", smollm2_tokenizer, examples, dtype, batch_size=2, gradient_accumulation_steps=4)
    loss_big, _ = big.accumulate_gradients(examples)
    loss_small, _ = small.accumulate_gradients(examples)
    assert abs(loss_big - loss_small) <= tol * abs(loss_big)
    for (name, p), (_, q) in zip(big.model.named_parameters(), small.model.named_parameters()):
        if p.requires_grad:
            assert (p.grad - q.grad).abs().max() <= tol * p.grad.abs().max(), name


def test_micro_batch_means_would_differ(tmp_path, smollm2_tokenizer):
    """Guard that the test above is sensitive: averaging per-micro-batch means gives another loss."""
    examples = random_examples(8)
    t = _trainer(tmp_path, smollm2_tokenizer, examples, batch_size=2, gradient_accumulation_steps=4)
    from pronghorn.data.collate import pad_batch

    with torch.no_grad():
        means = [float(t.model(**pad_batch(examples[i:i + 2], 2)).loss) for i in range(0, 8, 2)]
    exact, _ = t.accumulate_gradients(examples)
    assert abs(sum(means) / 4 - exact) > 1e-4


def test_resume_gives_same_loss_curve(tmp_path, smollm2_tokenizer):
    examples = random_examples(24)
    kw = dict(batch_size=2, gradient_accumulation_steps=2, max_steps=8, learning_rate=5e-3, warmup_steps=2,
              lr_scheduler="cosine", lora_dropout=0.1)
    torch.manual_seed(0)
    full = _trainer(tmp_path / "full", smollm2_tokenizer, examples, **kw).train()
    torch.manual_seed(0)
    cut = _trainer(tmp_path / "cut", smollm2_tokenizer, examples, save_steps=3, **{**kw, "max_steps": 8})
    cut.total_steps = 5  # stop early as if interrupted after step 5 (checkpoint-3 is the last saved)
    cut.train()
    torch.manual_seed(123)  # a different process state must not matter
    resumed = _trainer(tmp_path / "cut", smollm2_tokenizer, examples, resume_from_checkpoint="latest",
                       **kw).train()
    assert resumed.losses[:3] == full.losses[:3]
    assert resumed.losses == pytest.approx(full.losses, rel=1e-6, abs=0)
    rows = [json.loads(l) for l in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9))


def test_outputs_and_loss_goes_down(tmp_path, smollm2_tokenizer):
    examples = random_examples(4)
    res = _trainer(tmp_path, smollm2_tokenizer, examples, batch_size=4, gradient_accumulation_steps=1,
                   max_steps=20, learning_rate=3e-2, lr_scheduler="constant").train()
    assert res.losses[-1] < 0.92 * res.losses[0]  # random tokens: a smoke test; learning is tested on SmolLM2
    for name in ("adapter_config.json", "adapter_model.safetensors", "metrics.jsonl", "loss.png",
                 "tokenizer_config.json"):
        assert (tmp_path / name).is_file(), name
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s"} <= set(row)


def test_refuses_existing_output(tmp_path, smollm2_tokenizer):
    examples = random_examples(2)
    _trainer(tmp_path, smollm2_tokenizer, examples, max_steps=1).train()
    before = (tmp_path / "adapter_model.safetensors").read_bytes()
    with pytest.raises(OutputExistsError, match="overwrite"):
        _trainer(tmp_path, smollm2_tokenizer, examples, max_steps=1).train()
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == before
    _trainer(tmp_path, smollm2_tokenizer, examples, max_steps=1, overwrite=True).train()


def test_all_masked_step_is_an_error(tmp_path, smollm2_tokenizer):
    examples = [{"input_ids": [5, 6, 7], "labels": [-100, -100, -100]}]
    with pytest.raises(PronghornError, match="no trainable token"):
        _trainer(tmp_path, smollm2_tokenizer, examples, max_steps=1, batch_size=1,
                 gradient_accumulation_steps=1).train()
