"""Full fine-tuning test cases shared by tests/train: a tiny model whose every weight trains, and its trainer."""

from __future__ import annotations

from pathlib import Path

import torch

from helpers import make_pair
from pronghorn.train.config import TrainConfig
from pronghorn.train.full_finetune import make_full_finetuning
from pronghorn.train.trainer import Trainer

CASE = "smollm2_tied"  # tied table: trained once, through both its uses


class TinyTokenizer:  # the trainer reads the pad/eos ids and saves the tokenizer
    pad_token_id, eos_token_id = 0, 1

    def save_pretrained(self, path):
        (Path(path) / "tokenizer_config.json").write_text("{}")


def full_model(dtype=torch.float32, case=CASE):
    """(transformers model, pronghorn model with every weight trainable), the same weights."""
    hf, ours = make_pair(case, dtype=dtype)
    return hf, make_full_finetuning(ours)


def full_trainer(out, examples, model=None, **kw) -> Trainer:
    """A native trainer of ``model`` (default: a fresh :func:`full_model`); constant learning rate, no clipping."""
    kw = {"batch_size": 4, "gradient_accumulation_steps": 1, "learning_rate": 1e-3, "lr_scheduler": "constant",
          "max_grad_norm": 0.0, **kw}
    cfg = TrainConfig(output_dir=str(out), progress=False, overwrite=True, **kw)
    return Trainer(model if model is not None else full_model()[1], TinyTokenizer(), examples, cfg, base_name="tiny")
