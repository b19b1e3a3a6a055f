import os

import torch

# Triton kernels run on the CPU through Triton's interpreter when there is no GPU. Kernel modules are imported
# lazily (never by `import pronghorn`), so setting this here, before any test runs one, is enough.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest


@pytest.fixture(scope="session")
def smollm2_dir():
    """The cached HF checkpoint dir of SmolLM2-135M-Instruct (built from the GGUF once, then reused)."""
    from pronghorn.models.default_model import default_model_dir

    return default_model_dir()
