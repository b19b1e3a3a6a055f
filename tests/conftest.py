import pytest


@pytest.fixture(scope="session")
def smollm2_dir():
    """The cached HF checkpoint dir of SmolLM2-135M-Instruct (built from the GGUF once, then reused)."""
    from pronghorn.models.default_model import default_model_dir

    return default_model_dir()
