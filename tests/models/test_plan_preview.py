"""The memory plan previewed on the meta device (models/plan_preview.py, ``pronghorn plan``): the sizes it counts
are those of the real model built with values, and the plan is the planner's for them."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import torch

from pronghorn.cli import main
from pronghorn.errors import CheckpointError, PronghornError
from pronghorn.models.config import ModelConfig
from pronghorn.models.decoder import DecoderForCausalLM
from pronghorn.models.lora import LoRAConfig, attach_lora
from pronghorn.models.memory_plan import HEADROOM, step_sizes
from pronghorn.models.plan_preview import meta_step_sizes, preview_plan, read_config
from pronghorn.models.quantized_checkpoint import quantize_model_nf4

GIB = 2**30
SMALL = dict(model_type="llama", hidden_act="silu", rms_norm_eps=1e-5, hidden_size=256, intermediate_size=512,
             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
             max_position_embeddings=4096, tie_word_embeddings=False)
LLAMA_8B = dict(SMALL, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0)
LORA = LoRAConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"])
TABLES = ("untied_table", "tied_table")  # the meta preview offers the table to the host, as a GPU would


def _real_sizes(cfg: ModelConfig, qlora: bool):
    torch.manual_seed(0)
    model = DecoderForCausalLM(cfg, dtype=torch.bfloat16)
    model.tie_weights()
    if qlora:
        quantize_model_nf4(model)
    attach_lora(model, LORA)
    return step_sizes(model.model, 2, 128, torch.bfloat16, torch.device("cpu"), model.lm_head)


def test_meta_sizes_equal_the_real_models():
    cfg = ModelConfig.from_hf_dict(dict(SMALL))
    meta, real = asdict(meta_step_sizes(cfg, 2, 128, LORA)), asdict(_real_sizes(cfg, qlora=False))
    assert meta["untied_table"] == cfg.vocab_size * cfg.hidden_size * 2 and meta["tied_table"] == 0
    assert {k: v for k, v in meta.items() if k not in TABLES} == {k: v for k, v in real.items() if k not in TABLES}


def test_meta_sizes_of_qlora_count_nf4_as_stored():
    """NF4's bytes per weight (codes, absmax, double-quantized statistics) against real quantized weights: equal up
    to each weight's constant buffers (its 16-level code, the 256-entry statistics map, a partial last block)."""
    cfg = ModelConfig.from_hf_dict(dict(SMALL))
    meta, real = meta_step_sizes(cfg, 2, 128, LORA, load_in_4bit=True), _real_sizes(cfg, qlora=True)
    assert meta.dense_layer == real.dense_layer > 0 and meta.backward_extra == real.backward_extra
    nf4_weights = 7 * cfg.num_hidden_layers
    assert 0 <= real.resident - meta.resident <= 2048 * nf4_weights
    dense = asdict(meta_step_sizes(cfg, 2, 128, LORA))["resident"]
    assert meta.resident < 0.45 * dense  # the projections dominate this model's weights


def test_preview_plan_keeps_everything_without_a_budget_and_fits_a_budget():
    cfg = ModelConfig.from_hf_dict(dict(LLAMA_8B))
    free = preview_plan(cfg, 2, 2048)
    assert set(free.layers) == {"keep"} and free.budget_bytes is None
    capped = preview_plan(cfg, 2, 2048, "16.68GiB")
    assert capped.replays and capped.estimate_bytes <= 16.68 * GIB * (1 - HEADROOM)
    assert capped.replay_graphs  # as on a CUDA GPU
    qlora = preview_plan(cfg, 2, 2048, "16.68GiB", load_in_4bit=True)
    assert qlora.layers.count("keep") > 0  # NF4 weights leave room to keep layers
    assert set(preview_plan(cfg, 2, 2048, "40GiB", mode="unsloth").layers) == {"offload"}
    tight = preview_plan(cfg, 2, 4096, "20GiB", tiled_mlp="on", mlp_chunk=2048)
    assert tight.mlp_chunk == 2048 and preview_plan(cfg, 2, 4096, "24GiB", tiled_mlp=False).mlp_chunk is None


def test_preview_plan_names_the_smallest_budget_when_nothing_fits():
    cfg = ModelConfig.from_hf_dict(dict(LLAMA_8B))
    with pytest.raises(PronghornError, match=r"does not fit the memory budget of 8\.00 GiB.*at least 1\d\.\dGiB"):
        preview_plan(cfg, 2, 4096, "8GiB")


def test_read_config_from_a_file_a_directory_and_an_adapter(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text(json.dumps(SMALL))
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "base_model_name_or_path": str(tmp_path / "base"), "r": 8, "lora_alpha": 16,
         "target_modules": ["q_proj"]}))
    for source in (tmp_path / "base", tmp_path / "base" / "config.json", tmp_path / "adapter"):
        assert read_config(source).hidden_size == 256
    with pytest.raises(CheckpointError, match="no such file"):
        read_config(tmp_path / "missing")


def test_read_config_of_the_default_gguf_reads_no_weights(smollm2_dir):
    from pronghorn.models.default_model import find_default_gguf

    from_gguf, from_dir = read_config(find_default_gguf()), read_config("default")
    assert from_gguf.num_hidden_layers == from_dir.num_hidden_layers == 30
    assert (from_gguf.hidden_size, from_gguf.vocab_size) == (from_dir.hidden_size, from_dir.vocab_size)


def test_plan_command_prints_the_plan_and_refuses_what_does_not_fit(tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(LLAMA_8B))
    assert main(["plan", "--model", str(config), "--load-in-4bit", "--batch-size", "1", "--max-length", "8192",
                 "--max-memory", "16GiB"]) == 0
    out = capsys.readouterr().out
    assert "QLoRA r=16, batch 1 x 8192 tokens" in out and "budget 16.00 GiB (max_memory)" in out
    assert main(["plan", "--model", str(config), "--batch-size", "2", "--max-length", "4096",
                 "--max-memory", "12GiB"]) == 2
    assert "Raise max_memory to at least" in capsys.readouterr().err
    assert main(["plan", "--model", str(config), "--batch-size", "2", "--max-length", "2048"]) == 0
    lines = capsys.readouterr().out.splitlines()  # no budget: the plan, then what common cards would get
    assert "32 keep" in lines[1] and "no budget" in lines[1]
    assert lines[3].startswith("   8 GB card,  7.5 GiB: does not fit: Raise max_memory to at least")
    assert lines[6].startswith("  24 GB card, 23.5 GiB: 32 layers:") and "recompute" in lines[6]
    assert main(["plan", "--model", str(config), "--method", "dpo", "--max-memory", "24GiB"]) == 2
    assert "previews LoRA and QLoRA SFT steps" in capsys.readouterr().err
