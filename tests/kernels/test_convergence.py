"""Convergence: a mini model (2 layers of SmolLM2's shape) trained 20 steps with and without the Triton
kernels (run on the CPU by Triton's interpreter) from the same seed gives the same loss at every step and
the same LoRA weights. Tolerance (fp32): each step's loss within 1e-5 of the loss scale (the first loss):
cross-entropy is lse - logit, so its rounding error is set by the size of the logits, not by how small the
loss has become (the model memorises its batch, loss 7.7 -> 0.02); the final adapter weights within 1e-5 of
their largest element. The kernels differ from the reference only in the order of fp32 sums."""

import importlib

import pytest
import torch

from pronghorn.models.builder import init_random_model
from pronghorn.models.config import ModelConfig
from pronghorn.models.lora import LoRAConfig, attach_lora, lora_modules

OPS = ("rmsnorm", "rope", "swiglu", "linear_cross_entropy")
SMOLLM2_SHAPE = dict(model_type="llama", vocab_size=1000, hidden_size=576, intermediate_size=1536,
                     num_hidden_layers=2, num_attention_heads=9, num_key_value_heads=3, rms_norm_eps=1e-5,
                     rope_theta=100000.0, tie_word_embeddings=True, max_position_embeddings=8192)


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # on the CPU the kernels run in Triton's interpreter


def _train(steps=20):
    model = init_random_model(ModelConfig.from_hf_dict(SMOLLM2_SHAPE), torch.float32, DEVICE, seed=0, std=0.05)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))).to(DEVICE) * 0.1)
    attach_lora(model, LoRAConfig(r=8, lora_alpha=16), seed=1)
    model.train()
    # SGD with momentum: Adam divides by sqrt(v), which turns fp32 rounding noise in near-zero gradient
    # components into lr-sized steps and would hide real differences behind a loose weight tolerance
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)  # a smooth trajectory: 7.7 -> 0.02
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 1000, (2, 24), generator=g).to(DEVICE)
    labels = ids.clone()
    labels[:, :5] = -100  # a masked "prompt"
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, {n: (m.lora_A.detach().clone(), m.lora_B.detach().clone()) for n, m in lora_modules(model)}


def test_kernels_train_like_the_reference(monkeypatch):
    pytest.importorskip("triton")
    modules = [importlib.import_module(f"pronghorn.kernels.{op}") for op in OPS]
    for mod in modules:  # the reference path, also on a GPU
        monkeypatch.setattr(mod, "use_triton", lambda *tensors: False)
    ref_losses, ref_w = _train()
    calls = {op: 0 for op in OPS}
    for op, mod in zip(OPS, modules):

        def forced(*tensors, _op=op):
            calls[_op] += 1
            return True

        monkeypatch.setattr(mod, "use_triton", forced)
    losses, w = _train()
    assert all(calls.values()), calls  # every kernel really ran
    assert ref_losses[-1] < 0.7 * ref_losses[0]  # it learned something
    assert losses == pytest.approx(ref_losses, rel=0, abs=1e-5 * ref_losses[0])
    for name, (a, b) in w.items():
        ra, rb = ref_w[name]
        assert (a - ra).abs().max() <= 1e-5 * ra.abs().max(), name
        assert (b - rb).abs().max() <= 1e-5 * rb.abs().max(), name
