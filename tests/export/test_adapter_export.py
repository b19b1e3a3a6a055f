"""The PEFT adapter export (what vLLM serves): no modules_to_save, and a warning for weights it cannot carry.
(PEFT loading it with the same logits: tests/test_api.py::test_adapter_round_trip_with_peft; AutoPeftModel
resolving a default-model adapter's base: test_default_adapter_loads_with_auto_peft_model.)"""

import json
import warnings

import pytest
from helpers import tiny_lora_model
from safetensors import safe_open

from pronghorn.export.adapter import save_adapter
from pronghorn.models.adapter_format import adapter_base, base_record
from pronghorn.models.default_model import DEFAULT_HUB_ID


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


def test_recorded_base_is_resolvable_and_pronghorn_keeps_its_copy(tmp_path):
    """An adapter of the default model names its hub id (PEFT, vLLM resolve it) and pronghorn loads it onto its
    local copy; other bases are recorded as given; old adapters that recorded "default" still load."""
    model = tiny_lora_model()
    save_adapter(model, tmp_path / "default", base_model_name_or_path="default")
    save_adapter(model, tmp_path / "other", base_model_name_or_path="someone/model")
    recorded = {d: json.loads((tmp_path / d / "adapter_config.json").read_text())["base_model_name_or_path"]
                for d in ("default", "other")}
    assert recorded == {"default": DEFAULT_HUB_ID, "other": "someone/model"}
    assert adapter_base(tmp_path / "default") == "default" and adapter_base(tmp_path / "other") == "someone/model"
    with safe_open(str(tmp_path / "default" / "adapter_model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt", "pronghorn_base": "default"}
    old = json.loads((tmp_path / "other" / "adapter_config.json").read_text())
    (tmp_path / "other" / "adapter_config.json").write_text(json.dumps({**old, "base_model_name_or_path": "default"}))
    assert adapter_base(tmp_path / "other") == "default"
    assert base_record("smollm2") == (DEFAULT_HUB_ID, {"pronghorn_base": "default"})
