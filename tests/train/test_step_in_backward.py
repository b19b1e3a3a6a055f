"""The optimizer step fused into the backward pass (train/step_in_backward.py): the same weights as the ordinary
step, bit for bit (fp32 AdamW, with and without recompute; bf16 weights with stochastic rounding), the same
gradient norm, far fewer gradients alive at once, and a clear refusal of what it cannot do."""

import pytest
import torch

from full_finetune_cases import full_model, full_trainer as _trainer
from helpers import random_examples
from pronghorn.errors import PronghornError
from pronghorn.train.config import TrainConfig
from pronghorn.train.step_in_backward import StepInBackward

STEPS = 3


def _run(tmp_path, in_backward: bool, dtype=torch.float32, mode="off", **kw):
    _, model = full_model(dtype)
    model.gradient_checkpointing_enable(mode=mode)
    t = _trainer(tmp_path / str(in_backward), random_examples(12), model, max_steps=STEPS, batch_size=4,
                 optimizer_in_backward=in_backward, **kw)
    assert isinstance(t.optimizer, StepInBackward) == in_backward
    return t, t.train()


@pytest.mark.parametrize("dtype,mode", [(torch.float32, "off"), (torch.float32, "on"), (torch.bfloat16, "off")])
def test_weights_equal_the_ordinary_step(tmp_path, dtype, mode):
    """fp32: torch's fused AdamW; bf16: adamw_bf16_sr (each weight's rounding stream is its index's)."""
    (plain, a), (fused, b) = (_run(tmp_path, flag, dtype, mode) for flag in (False, True))
    assert a.losses == b.losses
    for (name, p), q in zip(plain.model.named_parameters(), fused.model.parameters()):
        assert torch.equal(p, q), name
    assert all(p.grad is None for p in fused.model.parameters())  # nothing left behind
    norms = [[r["grad_norm"] for r in _rows(t)] for t in (plain, fused)]
    # summed per parameter in fp32: another order; clip_grad_norm_ of bf16 gradients gives a bf16 value (a
    # relative spacing of 2**-7 between neighbours)
    assert norms[1] == pytest.approx(norms[0], rel=1e-5 if dtype == torch.float32 else 2**-7)


def _rows(t):
    import json

    return [json.loads(line) for line in (t.out / "metrics.jsonl").read_text().splitlines()]


def _peak_live_gradient_bytes(t) -> tuple[int, int]:
    """(the most gradient bytes alive at once during one optimizer step, all the gradients' bytes), counted by
    hooks that run as each gradient is complete (before the step-in-backward hook frees it)."""
    params = list(t.model.parameters())
    peak = [0]

    def count(_):
        peak[0] = max(peak[0], sum(q.grad.numel() * q.grad.element_size() for q in params if q.grad is not None))

    hooks = [p.register_post_accumulate_grad_hook(count) for p in params]
    if isinstance(t.optimizer, StepInBackward):  # the counters must run before the steppers: register again
        groups = [{"params": params, "peak_lr": 1e-3}]
        t.optimizer.remove()
        t.optimizer = StepInBackward(groups, lambda g, i: torch.optim.AdamW(g, lr=1e-3))
    t.model.train()
    t.train_step(t.step_examples(0))
    for h in hooks:
        h.remove()
    return peak[0], sum(p.numel() * p.element_size() for p in params)


def test_no_full_set_of_gradients_exists(tmp_path):
    """Ordinary step: every gradient alive at the end of the backward pass. In the backward: at most one
    parameter's (this tiny model's largest is its 97 x 48 tied table, 18.6 KB of 115 KB)."""
    plain, fused = (_trainer(tmp_path / str(f), random_examples(4), optimizer_in_backward=f) for f in (False, True))
    total_plain = _peak_live_gradient_bytes(plain)
    peak, total = _peak_live_gradient_bytes(fused)
    assert total_plain == (total, total)
    largest = max(p.numel() * p.element_size() for p in fused.model.parameters())
    assert peak == largest and peak < total / 6


def test_refuses_what_needs_every_gradient_at_once(tmp_path):
    with pytest.raises(PronghornError, match="gradient_accumulation_steps=1.*--gradient-accumulation-steps 1"):
        TrainConfig(optimizer_in_backward=True, gradient_accumulation_steps=2, max_grad_norm=0)
    with pytest.raises(PronghornError, match=r"max_grad_norm=1.0.*--max-grad-norm 0"):
        TrainConfig(optimizer_in_backward=True, gradient_accumulation_steps=1)
    t = _trainer(tmp_path, random_examples(4), optimizer_in_backward=True)
    assert t.cfg.max_grad_norm == 0


def test_8bit_adamw_in_the_backward_equals_its_ordinary_step():
    """bitsandbytes' AdamW8bit (it runs on the CPU, outside the trainer, which refuses it there): one optimizer per
    weight in the backward pass takes the ordinary step's weights bit for bit (its blocks are per tensor)."""
    bnb = pytest.importorskip("bitsandbytes")
    from pronghorn.data.collate import pad_batch

    batch = pad_batch(random_examples(4), 0)

    def run(in_backward):
        model = full_model()[1].train()
        groups = [{"params": list(model.parameters())}]
        build = lambda g, i=0: bnb.optim.AdamW8bit(g, lr=1e-3, min_8bit_size=0)  # noqa: E731
        opt = StepInBackward(groups, build) if in_backward else build(groups)
        for _ in range(STEPS):
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad()
        return list(model.parameters())

    assert all(torch.equal(a, b) for a, b in zip(run(False), run(True)))
