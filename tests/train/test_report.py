"""report_to: the native trainer's metrics also go to TensorBoard event files that TensorBoard's own reader loads,
with the same numbers as metrics.jsonl; a missing package or an unknown reporter is an error before training."""

from __future__ import annotations

import json

import pytest

from helpers import random_examples, tiny_lora_model
from pronghorn.errors import PronghornError
from pronghorn.train.config import TrainConfig
from pronghorn.train.report import REPORT_TO
from pronghorn.train.trainer import Trainer


def test_tensorboard_events_hold_loss_lr_grad_norm_and_tokens_per_s(tmp_path, smollm2_tokenizer):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = TrainConfig(output_dir=str(tmp_path), progress=False, report_to="tensorboard", max_steps=3, batch_size=2,
                      gradient_accumulation_steps=1, warmup_steps=1)
    Trainer(tiny_lora_model(), smollm2_tokenizer, random_examples(8), cfg, base_name="tiny").train()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "tokens"):
        got = [(e.step, e.value) for e in events.Scalars(f"train/{key}")]
        assert [s for s, _ in got] == [1, 2, 3], key
        assert [v for _, v in got] == pytest.approx([r[key] for r in rows], rel=1e-6), key  # float32 in the file


def test_unknown_reporter_or_missing_package_fails_when_the_config_is_built(monkeypatch):
    with pytest.raises(PronghornError, match=r"report_to \(CLI: --report-to\) must be one of none, tensorboard, "
                                             r"wandb, got 'mlflow'"):
        TrainConfig(report_to="mlflow")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(PronghornError, match=r"report_to='wandb' \(CLI: --report-to wandb\) needs the 'wandb' "
                                             r"package: pip install wandb"):
        TrainConfig(report_to="wandb")
    assert REPORT_TO == ("none", "tensorboard", "wandb")
