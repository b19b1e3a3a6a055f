import pytest
import torch


@pytest.fixture(scope="session")
def smollm2_fp32(smollm2_dir):
    """(pronghorn model, tokenizer) of the real SmolLM2-135M-Instruct in fp32 on the CPU, loaded once."""
    from pronghorn.api import FastLanguageModel

    return FastLanguageModel.from_pretrained(str(smollm2_dir), dtype=torch.float32, device="cpu")
