"""load_pretrained / resolve_local on HF checkpoint dirs: exact logits, and a clear error for every bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import make_pair
from pronghorn.api import FastLanguageModel
from pronghorn.errors import CheckpointError, PronghornError, UnsupportedModelError
from pronghorn.models.loader import load_pretrained, resolve_local


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def tokenizer_files(tmp_path_factory, smollm2_dir):
    """The SmolLM2 tokenizer, saved once; copied into each checkpoint dir (ids fed to the tiny models stay < 97)."""
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    AutoTokenizer.from_pretrained(str(smollm2_dir)).save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tokenizer_files):
    """{name: (hf_model, dir)}: tied + sharded (index + 11 shards), untied + single file."""
    out = {}
    for name, pair, shard in (("sharded_tied", "smollm2_tied", "20KB"), ("single_untied", "llama2", None)):
        hf, _ = make_pair(pair)
        d = tmp_path_factory.mktemp(name)
        hf.save_pretrained(str(d), **({"max_shard_size": shard} if shard else {}))
        for f in tokenizer_files.iterdir():
            shutil.copy(f, d / f.name)
        out[name] = (hf, d)
    return out


def _copy(checkpoints, name, tmp_path) -> Path:
    dst = tmp_path / name
    shutil.copytree(checkpoints[name][1], dst)
    return dst


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------- good inputs


@pytest.mark.parametrize("name", ["sharded_tied", "single_untied"])
def test_loads_with_hf_logits(checkpoints, name):
    hf, d = checkpoints[name]
    if name == "sharded_tied":
        files = sorted(p.name for p in d.glob("*.safetensors"))
        assert len(files) > 1 and (d / "model.safetensors.index.json").is_file()
        assert not (d / "model.safetensors").exists()
    else:
        assert (d / "model.safetensors").is_file() and not (d / "model.safetensors.index.json").exists()
    loaded = load_pretrained(str(d), dtype=torch.float32, device="cpu")
    model = loaded.model
    assert loaded.base_name == str(d) and loaded.base_dir == d and model.name_or_path == str(d)
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    assert tied == (name == "sharded_tied")
    ids = torch.randint(0, 97, (2, 19), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, out = hf(input_ids=ids).logits, model(input_ids=ids).logits
    assert out.shape == ref.shape and _rel(out, ref) <= 1e-5
    assert loaded.tokenizer("Hello")["input_ids"]  # the tokenizer came along
    assert model.generation_config.get("eos_token_id") == hf.generation_config.eos_token_id


def test_resolve_local_paths(checkpoints, tmp_path):
    d = checkpoints["single_untied"][1]
    assert resolve_local(str(d)) == (d, str(d))
    with pytest.raises(CheckpointError, match="no such file or directory"):
        resolve_local(str(tmp_path / "nope"))
    with pytest.raises(CheckpointError, match="no such file or directory"):
        resolve_local("nope.gguf")


# -------------------------------------------------------------------------------------------- bad inputs


def _break_no_config(d):
    (d / "config.json").unlink()
    return CheckpointError, [str(d / "config.json"), "not found"]


def _break_config_not_json(d):
    (d / "config.json").write_text('{"model_type": "llama", ')
    return CheckpointError, [str(d / "config.json"), "not valid JSON"]


def _break_gpt2(d):
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    return UnsupportedModelError, [str(d / "config.json"), "model_type 'gpt2'", "not supported"]


def _break_no_hidden_size(d):
    cfg = json.loads((d / "config.json").read_text())
    del cfg["hidden_size"]
    (d / "config.json").write_text(json.dumps(cfg))
    return CheckpointError, [str(d / "config.json"), "'hidden_size'", "missing"]


def _break_no_weights(d):
    (d / "model.safetensors").unlink()
    return CheckpointError, [str(d), "no model.safetensors"]


def _break_truncated(d):
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    return CheckpointError, [str(f), "safetensors"]


def _break_garbage(d):
    f = d / "model.safetensors"
    f.write_bytes(b"\xff" * 8 + b"not a safetensors header at all" * 10)
    return CheckpointError, [str(f), "safetensors"]


def _break_empty_file(d):
    (d / "model.safetensors").write_bytes(b"")
    return CheckpointError, [str(d / "model.safetensors"), "safetensors"]


def _break_missing_shard(d):
    shard = sorted(d.glob("model-*.safetensors"))[3]
    shard.unlink()
    return CheckpointError, [str(shard), "missing", "model.safetensors.index.json"]


def _break_bad_index(d):
    (d / "model.safetensors.index.json").write_text('{"metadata": {}}')
    return CheckpointError, [str(d / "model.safetensors.index.json"), "malformed"]


def _break_pickle_only(d):
    sd = load_file(d / "model.safetensors")
    (d / "model.safetensors").unlink()
    torch.save(sd, d / "pytorch_model.bin")
    return CheckpointError, [str(d), "pickle", "safetensors"]


def _break_wrong_shape(d):
    sd = load_file(d / "model.safetensors")
    key = "model.layers.1.mlp.up_proj.weight"
    sd[key] = torch.zeros(81, 48)
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    return CheckpointError, [str(d), key, "(81, 48)", "(80, 48)"]


def _break_missing_tensor(d):
    sd = load_file(d / "model.safetensors")
    key = "model.layers.0.self_attn.k_proj.weight"
    del sd[key]
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    return CheckpointError, [str(d), "missing", key]


def _break_untied_without_head(d):
    sd = load_file(d / "model.safetensors")
    del sd["lm_head.weight"]
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    return CheckpointError, [str(d), "missing", "lm_head.weight"]


def _break_unexpected_tensor(d):
    sd = load_file(d / "model.safetensors")
    sd["model.layers.2.mlp.up_proj.weight"] = torch.zeros(80, 48)  # a third layer the config does not have
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    return CheckpointError, [str(d), "unexpected", "model.layers.2.mlp.up_proj.weight"]


def _break_rope_type(d):
    cfg = json.loads((d / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "weird", "rope_theta": 10000.0}
    (d / "config.json").write_text(json.dumps(cfg))
    return UnsupportedModelError, [str(d), "rope_type 'weird'"]


def _break_rope_field(d):
    cfg = json.loads((d / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "linear", "rope_theta": 10000.0}  # no "factor"
    (d / "config.json").write_text(json.dumps(cfg))
    return CheckpointError, [str(d), "'linear'", "'factor'"]


def _break_no_tokenizer(d):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (d / name).unlink()
    return CheckpointError, [str(d), "tokenizer could not be loaded"]


BREAKS = {
    "no_config": ("single_untied", _break_no_config),
    "config_not_json": ("single_untied", _break_config_not_json),
    "unsupported_model_type": ("single_untied", _break_gpt2),
    "config_without_hidden_size": ("single_untied", _break_no_hidden_size),
    "no_weights": ("single_untied", _break_no_weights),
    "truncated_safetensors": ("single_untied", _break_truncated),
    "garbage_safetensors": ("single_untied", _break_garbage),
    "empty_safetensors": ("single_untied", _break_empty_file),
    "index_lists_missing_shard": ("sharded_tied", _break_missing_shard),
    "malformed_index": ("sharded_tied", _break_bad_index),
    "pickle_only": ("single_untied", _break_pickle_only),
    "wrong_shape": ("single_untied", _break_wrong_shape),
    "missing_tensor": ("single_untied", _break_missing_tensor),
    "untied_config_without_lm_head": ("single_untied", _break_untied_without_head),
    "unexpected_tensor": ("single_untied", _break_unexpected_tensor),
    "unsupported_rope_type": ("single_untied", _break_rope_type),
    "rope_scaling_missing_field": ("single_untied", _break_rope_field),
    "no_tokenizer": ("single_untied", _break_no_tokenizer),
}


@pytest.mark.parametrize("case", sorted(BREAKS))
def test_bad_checkpoint_clear_error_and_untouched(checkpoints, tmp_path, case):
    base, breaker = BREAKS[case]
    d = _copy(checkpoints, base, tmp_path)
    exc, fragments = breaker(d)
    before = _snapshot(tmp_path)
    with pytest.raises(exc) as info:
        load_pretrained(str(d), dtype=torch.float32, device="cpu")
    msg = str(info.value)
    for fragment in fragments:
        assert fragment in msg, f"{fragment!r} not in {msg!r}"
    assert _snapshot(tmp_path) == before, "a failed load changed the user's files"


@pytest.mark.parametrize("change", ["not_an_object", "hidden_size_string", "hidden_size_null"])
def test_malformed_config_values(checkpoints, tmp_path, change):
    d = _copy(checkpoints, "single_untied", tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    bad = {"not_an_object": [cfg], "hidden_size_string": {**cfg, "hidden_size": "abc"},
           "hidden_size_null": {**cfg, "hidden_size": None}}[change]
    (d / "config.json").write_text(json.dumps(bad))
    with pytest.raises(CheckpointError) as info:
        load_pretrained(str(d), dtype=torch.float32, device="cpu")
    assert str(d / "config.json") in str(info.value)
    if change != "not_an_object":
        assert "hidden_size" in str(info.value)


def test_missing_directory(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(CheckpointError, match="no such file or directory") as info:
        load_pretrained(str(missing), device="cpu")
    assert str(missing) in str(info.value)
    assert not missing.exists()


def test_empty_directory(tmp_path):
    with pytest.raises(CheckpointError, match="config.json") as info:
        load_pretrained(str(tmp_path), device="cpu")
    assert str(tmp_path) in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_plain_file_is_not_a_checkpoint(tmp_path):
    f = tmp_path / "weights.txt"
    f.write_text("hello")
    with pytest.raises(CheckpointError, match="not a checkpoint directory") as info:
        load_pretrained(str(f), device="cpu")
    assert str(f) in str(info.value) and f.read_text() == "hello"


# ---------------------------------------------------------------------------------------------- the hub


@pytest.fixture
def hub_sandbox(monkeypatch, tmp_path):
    """No real network and no real cache: huggingface_hub reads these at import time, so patch the constants."""
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    return constants


def _check_hub_error(info, tmp_path):
    msg = str(info.value)
    assert "someone/some-model" in msg and "could not download" in msg
    assert "local checkpoint directory" in msg  # tells the user what to do instead
    assert not (tmp_path / "hf_cache" / "models--someone--some-model" / "snapshots").exists()


def test_hub_id_offline_mode(hub_sandbox, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_sandbox, "HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointError) as info:
        load_pretrained("someone/some-model", device="cpu")
    _check_hub_error(info, tmp_path)


def test_hub_id_network_failure_is_quick(hub_sandbox, monkeypatch, tmp_path):
    """Online but the hub is unreachable (a closed local port: refused at once, whatever the sandbox's network)."""
    import time

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(hub_sandbox, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_sandbox, "ENDPOINT", "http://127.0.0.1:9")
    start = time.monotonic()
    with pytest.raises(CheckpointError) as info:
        FastLanguageModel.from_pretrained("someone/some-model", device="cpu")
    assert time.monotonic() - start < 30
    _check_hub_error(info, tmp_path)


# ------------------------------------------------------------------------------ FastLanguageModel options


def test_fast_language_model_loads_dir(checkpoints):
    hf, d = checkpoints["single_untied"]
    model, tokenizer = FastLanguageModel.from_pretrained(str(d), dtype=torch.float32, device="cpu")
    ids = torch.tensor([[1, 5, 9, 96]])
    with torch.no_grad():
        assert _rel(model(input_ids=ids).logits, hf(input_ids=ids).logits) <= 1e-5
    assert tokenizer.pad_token_id is not None


def test_8bit_loading_not_implemented(checkpoints):  # 4-bit (NF4 QLoRA): tests/models/test_qlora.py
    d = checkpoints["single_untied"][1]
    with pytest.raises(NotImplementedError, match=r"load_in_8bit.*load_in_4bit=True"):
        FastLanguageModel.from_pretrained(str(d), load_in_8bit=True)


def test_trust_remote_code_refused(checkpoints):
    d = checkpoints["single_untied"][1]
    with pytest.raises(PronghornError, match="trust_remote_code"):
        FastLanguageModel.from_pretrained(str(d), trust_remote_code=True)
