"""The native trainer with embed_tokens / lm_head in target_modules: their own learning rate
(embedding_learning_rate, also from YAML and the CLI), and exact resume with the tables in the checkpoint."""

import pytest
import torch
from helpers import make_pair, random_examples

from pronghorn.cli import build_parser
from pronghorn.errors import PronghornError
from pronghorn.models.lora import LoRAConfig, attach_lora
from pronghorn.train.config import TrainConfig
from pronghorn.train.trainer import Trainer

TARGETS = ["q_proj", "v_proj", "embed_tokens", "lm_head"]


def _trainer(tmp_path, tok, targets=TARGETS, **kw):
    _, model = make_pair("llama2")
    attach_lora(model, LoRAConfig(r=4, lora_alpha=8, target_modules=targets), seed=3)
    cfg = TrainConfig(output_dir=str(tmp_path), progress=False, batch_size=2, gradient_accumulation_steps=1,
                      lr_scheduler="constant", **kw)
    return Trainer(model, tok, random_examples(8), cfg, base_name="tiny")


def test_tables_take_their_own_learning_rate(tmp_path, smollm2_tokenizer):
    """AdamW's first step moves each weight by the learning rate (m / sqrt(v) = sign of the gradient): the tables by
    embedding_learning_rate, the adapters by learning_rate."""
    t = _trainer(tmp_path, smollm2_tokenizer, max_steps=1, learning_rate=1e-3, embedding_learning_rate=1e-4,
                 max_grad_norm=0.0, adam_epsilon=1e-12)
    table, head = t.model.model.embed_tokens.weight, t.model.lm_head.weight
    before = table.detach().clone(), head.detach().clone()
    assert [g["peak_lr"] for g in t.optimizer.param_groups] == [1e-3, 1e-4]
    assert {id(p) for p in t.optimizer.param_groups[1]["params"]} == {id(table), id(head)}
    t.train()
    for now, then in zip((table, head), before):
        step = (now.detach() - then).abs().max().item()
        assert step == pytest.approx(1e-4, rel=1e-3)
    a = t.model.model.layers[0].self_attn.q_proj.lora_A
    assert t.optimizer.param_groups[0]["lr"] == 1e-3 and t.optimizer.param_groups[1]["lr"] == 1e-4
    assert a.grad is None  # zeroed after the step; the adapters were in the first group
    with pytest.raises(PronghornError, match="embedding_learning_rate is set but embed_tokens / lm_head do not"):
        _trainer(tmp_path / "b", smollm2_tokenizer, targets=["q_proj"], embedding_learning_rate=1e-4)


def test_resume_restores_the_tables(tmp_path, smollm2_tokenizer):
    kw = dict(max_steps=4, learning_rate=5e-3, embedding_learning_rate=1e-3)
    torch.manual_seed(0)
    full = _trainer(tmp_path / "full", smollm2_tokenizer, **kw).train()
    cut = _trainer(tmp_path / "cut", smollm2_tokenizer, save_steps=2, **kw)
    cut.total_steps = 3
    cut.train()
    resumed = _trainer(tmp_path / "cut", smollm2_tokenizer, resume_from_checkpoint="latest", **kw).train()
    assert resumed.losses == pytest.approx(full.losses, rel=1e-6, abs=0)


def test_yaml_and_cli_take_it(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("embedding_learning_rate: 5e-5\ntarget_modules: [q_proj, embed_tokens, lm_head]\n")
    cfg = TrainConfig.from_yaml(recipe)
    assert cfg.embedding_learning_rate == 5e-5 and cfg.target_modules[-1] == "lm_head"
    args = build_parser().parse_args(["train", "--embedding-learning-rate", "1e-5", "--target-modules", "q_proj",
                                      "embed_tokens"])
    assert args.embedding_learning_rate == 1e-5 and args.target_modules == ["q_proj", "embed_tokens"]
    with pytest.raises(PronghornError, match="embedding_learning_rate.*--embedding-learning-rate.*> 0"):
        TrainConfig(embedding_learning_rate=0.0)
