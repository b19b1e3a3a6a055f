"""The same loss curve on real data (SmolLM2-135M-Instruct, gsm8k train, padding-free packed rows, LoRA):

- CPU: the plain path against the same path under an auto plan that mixes keep / recompute / offload per
  layer: identical in fp32 (recomputation replays the same ops). To fit
  the CPU test budget only the model's first 3 layers run (real weights, tokenizer and data; 2 steps).
- CUDA: 50 steps with the fast kernels against the PyTorch reference path (``KernelPolicy(reference=True)``), both bf16.
  "Within bf16 noise" is measured, not assumed: the bf16 reference's distance from an fp32 reference run is
  the noise floor, and the kernels must stay within ``NOISE_FACTOR`` times it (or ``FLOOR``).
"""

import json
from itertools import islice
from pathlib import Path

import pytest
import torch

from pronghorn.data import tokenize_dataset
from pronghorn.kernels.policy import KernelPolicy
from pronghorn.models.memory_plan import MemoryPlan
from pronghorn.models.loader import load_pretrained
from pronghorn.models.lora import LoRAConfig, attach_lora
from pronghorn.train.config import TrainConfig
from pronghorn.train.trainer import Trainer

_REPO = Path(__file__).resolve().parents[2]
GSM8K = next((p for p in (_REPO / "shared", _REPO.parent / "shared", Path("/work/shared"))
              if (p / "data/gsm8k/train.jsonl").is_file()), _REPO / "shared") / "data/gsm8k/train.jsonl"
NOISE_FACTOR, FLOOR = 2.0, 0.02  # GPU: kernels vs reference, per step, against the bf16-vs-fp32 distance

pytestmark = pytest.mark.skipif(not GSM8K.is_file(), reason=f"{GSM8K} not present")


def _examples(tokenizer, rows: int, max_length: int) -> list[dict]:
    with GSM8K.open() as f:
        data = [json.loads(line) for line in islice(f, rows)]
    records = [{"messages": [{"role": "user", "content": r["question"]},
                             {"role": "assistant", "content": r["answer"]}]} for r in data]
    return tokenize_dataset(records, tokenizer, "messages", max_length, progress=False, overlong="drop")


def _lora_model(model_dir, dtype, device, layers: int | None = None):
    loaded = load_pretrained(str(model_dir), dtype, device)
    if layers is not None:  # the CPU budget: the first layers of the real model (real embeddings, norm, head)
        loaded.model.model.layers = loaded.model.model.layers[:layers]
    attach_lora(loaded.model, LoRAConfig(r=8, lora_alpha=16, lora_dropout=0.05), seed=3407)
    start = {n: p.detach().clone() for n, p in loaded.model.named_parameters() if p.requires_grad}
    return loaded.model, loaded.tokenizer, start


def _curve(model, tokenizer, start, examples, steps, mode, tmp_path, **settings) -> list[float]:
    """Losses of ``steps`` optimizer steps from the same adapter init, data order and dropout seed."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in start:
                p.copy_(start[n])
    model.gradient_checkpointing_enable(mode=mode)
    model.train()
    cfg = TrainConfig(output_dir=str(tmp_path), progress=False, packing=True, gradient_checkpointing=mode,
                      max_steps=steps, **settings)
    trainer = Trainer(model, tokenizer, examples, cfg, base_name="smollm2")
    torch.manual_seed(0)
    losses = []
    for step in range(steps):
        trainer._set_lr(step)
        losses.append(trainer.train_step(trainer.step_examples(step))[0])
    return losses


def test_checkpointing_modes_give_the_same_curve_on_cpu(smollm2_dir, tmp_path, monkeypatch):
    model, tokenizer, start = _lora_model(smollm2_dir, torch.float32, "cpu", layers=3)
    examples = _examples(tokenizer, 4, 256)
    settings = dict(max_length=256, batch_size=1, gradient_accumulation_steps=1, learning_rate=1e-3)
    reference = _curve(model, tokenizer, start, examples, 2, "off", tmp_path, **settings)
    n = len(model.model.layers)
    mixed = tuple(("keep", "recompute", "offload")[i % 3] for i in range(n))
    model.model.forced_plan = MemoryPlan(mixed, split_replay=True)
    assert mixed == ("keep", "recompute", "offload")  # every per-layer mode (named modes: models/test_recompute)
    assert _curve(model, tokenizer, start, examples, 2, "auto", tmp_path, **settings) == reference
    assert reference[1] != reference[0]  # the second step saw the first update


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_kernels_follow_the_reference_curve_on_gpu(smollm2_dir, tmp_path):
    settings = dict(max_length=1024, batch_size=4, gradient_accumulation_steps=2, learning_rate=2e-4,
                    warmup_steps=5, lr_scheduler="linear")
    steps = 50
    model, tokenizer, start = _lora_model(smollm2_dir, torch.float32, "cuda")
    examples = _examples(tokenizer, 2000, 1024)
    model.set_kernel_policy(KernelPolicy(reference=True))
    fp32 = _curve(model, tokenizer, start, examples, steps, "off", tmp_path, **settings)
    del model
    model, tokenizer, start = _lora_model(smollm2_dir, torch.bfloat16, "cuda")
    model.set_kernel_policy(KernelPolicy(reference=True))
    reference = _curve(model, tokenizer, start, examples, steps, "off", tmp_path, **settings)
    model.set_kernel_policy(KernelPolicy())
    curves = {mode: _curve(model, tokenizer, start, examples, steps, mode, tmp_path, **settings)
              for mode in ("off", "offload", "auto")}
    noise = max(abs(a - b) for a, b in zip(reference, fp32))
    tolerance = max(NOISE_FACTOR * noise, FLOOR)
    report = {"fp32_reference": fp32, "bf16_reference": reference, **curves, "noise": noise, "tolerance": tolerance}
    print(json.dumps({k: v if not isinstance(v, list) else [round(x, 4) for x in v] for k, v in report.items()}))
    assert reference[-1] < reference[0] - 0.1  # it learns: the comparison is about a real curve
    for mode, losses in curves.items():
        worst = max(abs(a - b) for a, b in zip(losses, reference))
        assert worst <= tolerance, (mode, worst, tolerance)
