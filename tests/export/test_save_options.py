"""Every keyword of the model's save methods (save_pretrained, save_pretrained_merged, save_pretrained_gguf)
either does what it says or is refused with an error naming it; nothing is silently dropped, and a refused
call writes nothing."""

import json

import pytest
import torch
from safetensors import safe_open

from pronghorn import FastLanguageModel
from pronghorn.errors import PronghornError
from pronghorn.models.lora import merge_lora


@pytest.fixture
def tiny_lora(tiny_smollm2_dir):
    model, tok = FastLanguageModel.from_pretrained(str(tiny_smollm2_dir), dtype=torch.float32)
    return FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False), tok


def _dtypes(path):
    out = set()
    for f in path.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as st:
            out |= {st.get_slice(k).get_dtype() for k in st.keys()}
    return out


@pytest.mark.parametrize("dtype,stored,name", [(None, "BF16", "bfloat16"), (torch.float32, "F32", "float32"),
                                               ("float16", "F16", "float16"), ("torch.float32", "F32", "float32")])
def test_merged_dtype_is_honoured(tiny_lora, tmp_path, dtype, stored, name):
    model, tok = tiny_lora
    out = model.save_pretrained_merged(tmp_path / "m", tok, dtype=dtype)
    assert _dtypes(out) == {stored}
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == name


def test_max_shard_size_is_honoured(tiny_lora, tmp_path):
    model, tok = tiny_lora
    out = model.save_pretrained_merged(tmp_path / "m", tok, max_shard_size="2MB")
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1 and (out / "model.safetensors.index.json").is_file()
    merge_lora(model)  # no adapter: save_pretrained writes the full model, sharded the same way
    out = model.save_pretrained(tmp_path / "full", max_shard_size="2MB")
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1


def test_is_main_process_false_writes_nothing(tiny_lora, tmp_path):
    model, tok = tiny_lora
    model.save_pretrained(tmp_path / "a", is_main_process=False)
    model.save_pretrained_merged(tmp_path / "b", tok, is_main_process=False)
    assert model.save_pretrained_gguf(tmp_path / "c", tok, is_main_process=False) == []
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("call,match", [
    (lambda m, t, d: m.save_pretrained_merged(d, t, save_method="lora", dtype=torch.float32),
     r"save_method='lora' does not use dtype"),
    (lambda m, t, d: m.save_pretrained_merged(d, t, save_method="lora", max_shard_size="1GB"),
     r"save_method='lora' does not use max_shard_size"),
    (lambda m, t, d: m.save_pretrained_merged(d, t, save_method="lora", base_checkpoint=d),
     r"save_method='lora' does not use base_checkpoint"),
    (lambda m, t, d: m.save_pretrained_merged(d, t, save_method="merged_4bit_forced", max_shard_size="1GB"),
     r"save_method='merged_4bit_forced' does not use max_shard_size \(it uses dtype\)"),
    (lambda m, t, d: m.save_pretrained_merged(d, t, dtype=torch.int8), r"dtype torch.int8 is not a dtype for merged"),
    (lambda m, t, d: m.save_pretrained_merged(d, t, dtype="fp8"), r"dtype 'fp8' is not a dtype for merged"),
    (lambda m, t, d: m.save_pretrained_merged(d, t, safe_serialization=False),
     r"save_pretrained_merged: unsupported safe_serialization=False"),
    (lambda m, t, d: m.save_pretrained_merged(d, t, push_to_hub=True, token="x"),
     r"unsupported push_to_hub=True, token='x'"),
    (lambda m, t, d: m.save_pretrained_merged(d, t, maximum_memory_usage=0.5), r"maximum_memory_usage=0.5"),
    (lambda m, t, d: m.save_pretrained(d, max_shard_size="1GB"), r"max_shard_size applies to a full model"),
    (lambda m, t, d: m.save_pretrained(d, state_dict={}), r"save_pretrained: unsupported state_dict=\{\}"),
    (lambda m, t, d: m.save_pretrained(d, safe_serialization=False), r"unsupported safe_serialization=False"),
    (lambda m, t, d: m.save_pretrained_gguf(d, t, first_conversion="f16"),
     r"save_pretrained_gguf: unsupported first_conversion='f16'"),
])
def test_unused_or_unknown_options_are_refused(tiny_lora, tmp_path, call, match):
    model, tok = tiny_lora
    with pytest.raises(PronghornError, match=match):
        call(model, tok, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_options_that_ask_for_what_pronghorn_does_pass(tiny_lora, tmp_path):
    model, tok = tiny_lora
    model.save_pretrained(tmp_path / "a", safe_serialization=True, save_peft_format=True, push_to_hub=False,
                          token=None)
    assert (tmp_path / "a" / "adapter_model.safetensors").is_file()
    model.save_pretrained_merged(tmp_path / "m", tok, safe_serialization=True, push_to_hub=False)
    assert (tmp_path / "m" / "model.safetensors").is_file()
