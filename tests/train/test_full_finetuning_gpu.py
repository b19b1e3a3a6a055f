"""Full fine-tuning's CUDA paths, for a session with a GPU (skipped elsewhere, CI included): the fused SR AdamW
kernel equals its CPU reference bit for bit; the trainer on bf16 weights (adamw_bf16_sr by default, the step in the
backward, bitsandbytes' 8-bit AdamW) resumes with the same loss curve and saves a transformers checkpoint."""

import pytest
import torch

from full_finetune_cases import full_model, full_trainer
from helpers import random_examples
from pronghorn.kernels.adamw_sr import adamw_sr_constants, adamw_sr_step, adamw_sr_step_reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_sr_kernel_on_cuda_equals_the_cpu_reference():
    g = torch.Generator().manual_seed(0)
    cpu = [(torch.randn(1000, 77, generator=g) * 0.05).to(torch.bfloat16), torch.randn(1000, 77, generator=g).to(
        torch.bfloat16), torch.randn(1000, 77, generator=g) * 0.1, torch.rand(1000, 77, generator=g) * 0.01]
    gpu = [t.cuda() for t in cpu]
    constants = adamw_sr_constants(1e-4, 0.9, 0.999, 1e-8, 0.01, 7)
    adamw_sr_step_reference(*cpu, 4242, constants)
    adamw_sr_step(*gpu, 4242, constants)  # the Triton kernel on CUDA
    for a, b in zip(cpu, gpu):
        assert torch.equal(a, b.cpu())


@pytest.mark.parametrize("extra", [{}, dict(optimizer_in_backward=True, max_grad_norm=0.0),
                                   dict(optim="adamw_8bit", optimizer_in_backward=True, max_grad_norm=0.0),
                                   dict(optim="adamw_8bit")], ids=["sr", "sr-in-backward", "8bit-in-backward", "8bit"])
def test_bf16_full_finetuning_resumes_exactly_on_cuda(tmp_path, extra):
    if "8bit" in str(extra.get("optim")):
        pytest.importorskip("bitsandbytes")
    examples = random_examples(4) * 6  # seen 3 times each: random tokens start at their entropy, so only
    # memorising them can lower the loss
    kw = {**dict(batch_size=2, gradient_accumulation_steps=1, max_steps=6, learning_rate=1e-3, save_steps=3,
                 max_grad_norm=1.0), **extra}

    def model():
        return full_model(torch.bfloat16)[1].cuda()

    full = full_trainer(tmp_path / "full", examples, model(), **kw).train()
    cut = full_trainer(tmp_path / "cut", examples, model(), **kw)
    cut.total_steps = 4
    cut.train()
    resumed = full_trainer(tmp_path / "cut", examples, model(), resume_from_checkpoint="latest", **kw).train()
    assert resumed.losses == full.losses
    assert full.losses[-1] < full.losses[0]
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "full"), dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in hf.parameters())
