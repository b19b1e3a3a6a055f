"""fp16 loss scaling in the native trainers: gradients that underflow fp16 survive, an overflowed step is skipped,
and the scale is resumed from a checkpoint (on the CPU under fp16 autocast, as a T4 trains under it on CUDA)."""

import json

import pytest
import torch

from helpers import random_examples, randomize_lora_b, tiny_lora_model
from pronghorn.data.collate import pad_batch
from pronghorn.errors import PronghornError
from pronghorn.train.config import TrainConfig
from pronghorn.train.loss_scaling import backward, clip_and_step, loss_scaler
from pronghorn.train.trainer import Trainer


def test_a_scaler_for_fp16_only():
    cpu = torch.device("cpu")
    assert loss_scaler(cpu, None) is None and loss_scaler(cpu, torch.bfloat16) is None
    assert isinstance(loss_scaler(cpu, torch.float16), torch.amp.GradScaler)
    with pytest.raises(PronghornError, match="optimizer_in_backward cannot train in float16"):
        loss_scaler(cpu, torch.float16, in_backward=True)
    fp16_weights = [torch.nn.Parameter(torch.zeros(2, dtype=torch.float16))]  # full fine-tuning of a fp16 model
    assert loss_scaler(cpu, torch.float16, params=fp16_weights) is None


def _model():
    model = tiny_lora_model()
    randomize_lora_b(model)  # B = 0 would leave A without a gradient
    return model


def _adapter_grads(scaler, factor: float):
    """Adapter gradients of a (tiny) loss under fp16 autocast, unscaled: what the optimizer would see."""
    model = _model()
    batch = pad_batch(random_examples(4), 0)
    with torch.autocast("cpu", dtype=torch.float16):
        loss = model(**batch).loss * factor
    backward(scaler, loss)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.0)
    if scaler is not None:
        scaler.unscale_(optimizer)
    return [p.grad.clone() for p in params], model, params, optimizer


def test_scaled_gradients_survive_where_fp16_underflows():
    """A loss 1e-6 as large: fp16's backward flushes most adapter gradients to zero; scaled by 2^16 they keep
    their values (the fp32 reference: the same step without autocast)."""
    with torch.autocast("cpu", enabled=False):
        model = _model()
        (model(**pad_batch(random_examples(4), 0)).loss * 1e-6).backward()
        ref = [p.grad for p in model.parameters() if p.requires_grad]
    plain, *_ = _adapter_grads(None, 1e-6)
    scaled, *_ = _adapter_grads(torch.amp.GradScaler("cpu", init_scale=2.0 ** 16), 1e-6)

    def error(grads):
        return max(((g - r).abs().max() / r.abs().max()).item() for g, r in zip(grads, ref))

    assert error(plain) > 0.5  # underflowed
    assert error(scaled) < 0.05  # fp16 rounding only


def test_an_overflowed_step_is_skipped_and_the_scale_halved():
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 40)  # past fp16's range in the backward
    _, model, params, optimizer = _adapter_grads(scaler, 1.0)
    before = [p.detach().clone() for p in params]
    optimizer.param_groups[0]["lr"] = 1.0
    scaler.unscale_ = lambda opt: None  # _adapter_grads unscaled already
    norm = clip_and_step(scaler, optimizer, params, 1.0)
    assert not torch.isfinite(torch.tensor(norm))
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert scaler.get_scale() == 2.0 ** 39


def _fp16_trainer(tmp_path, tok, examples, **kw):
    cfg = TrainConfig(output_dir=str(tmp_path), progress=False, **kw)
    trainer = Trainer(tiny_lora_model(kw.get("lora_dropout", 0.0)), tok, examples, cfg, base_name="tiny")
    trainer.autocast_dtype = torch.float16  # what a fp16 model on a GPU gets (the CPU autocasts to it too)
    # a scale past the tiny model's range, and growth every 2 steps: the scale moves both ways in 8 steps
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 30, growth_interval=2)
    return trainer


def test_fp16_training_resumes_with_its_scale(tmp_path, smollm2_tokenizer):
    examples = random_examples(24)
    kw = dict(batch_size=2, gradient_accumulation_steps=2, max_steps=8, learning_rate=5e-3, warmup_steps=2)
    full = _fp16_trainer(tmp_path / "full", smollm2_tokenizer, examples, **kw)
    full_result = full.train()
    assert all(torch.isfinite(torch.tensor(full_result.losses)))
    assert full.scaler.get_scale() < 2.0 ** 30  # steps overflowed (skipped) at the initial scale
    cut = _fp16_trainer(tmp_path / "cut", smollm2_tokenizer, examples, save_steps=3, **kw)
    cut.total_steps = 5
    cut.train()
    state = json.loads((tmp_path / "cut" / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["loss_scale"]["scale"] < 2.0 ** 30
    resumed = _fp16_trainer(tmp_path / "cut", smollm2_tokenizer, examples, resume_from_checkpoint="latest", **kw)
    assert resumed.train().losses == full_result.losses
    assert resumed.scaler.get_scale() == full.scaler.get_scale()
