"""The PEFT adapter export (what vLLM serves): no modules_to_save, and a warning for weights it cannot carry.
(PEFT loading it with the same logits: tests/test_api.py::test_adapter_round_trip_with_peft.)"""

import json
import warnings

import pytest
from helpers import tiny_lora_model

from pronghorn.export.adapter import save_adapter


def test_adapter_has_no_modules_to_save_and_no_warning(tmp_path):
    model = tiny_lora_model()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        save_adapter(model, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["modules_to_save"] is None and config["peft_type"] == "LORA"


def test_trained_embeddings_are_named_in_a_warning(tmp_path):
    model = tiny_lora_model()
    model.model.embed_tokens.weight.requires_grad_(True)
    with pytest.warns(UserWarning, match="embeddings / LM head.*embed_tokens.*NOT in the adapter"):
        save_adapter(model, tmp_path / "a")
