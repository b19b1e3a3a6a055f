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
    """The cached HF checkpoint dir of SmolLM2-135M-Instruct (built from the GGUF once, then reused)."""
    from pronghorn.models.default_model import default_model_dir

    return default_model_dir()


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
