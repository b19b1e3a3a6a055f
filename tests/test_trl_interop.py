"""pronghorn's model under TRL's SFTTrainer, unpatched: packing with padding-free position_ids, completion-only
and assistant-only losses. TRL's loss (its own fused LM head over our hidden states) must equal our native loss
on the same batch, a packed batch must score like its sequences run alone, and a few steps must lower the loss."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from chat_reference import SMOL_GENERATION_TEMPLATE  # noqa: E402
from pronghorn import FastLanguageModel  # noqa: E402
from pronghorn.data import IGNORE_INDEX, tokenize_record  # noqa: E402

MAX_LENGTH = 96


@pytest.fixture(scope="module")
def gsm8k():
    path = Path("/work/shared/data/gsm8k/train.jsonl")
    if not path.is_file():
        pytest.skip(f"shared datasets not found at {path.parent}")
    rows = [json.loads(line) for line in path.read_text().splitlines()[:8]]
    return [(r["question"], r["answer"]) for r in rows]


def _model(tiny_smollm2_dir):
    model, tok = FastLanguageModel.from_pretrained(str(tiny_smollm2_dir), dtype=torch.float32)
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    return model, tok


def _trainer(model, tok, rows, tmp_path, **config):
    settings = dict(output_dir=str(tmp_path), max_length=MAX_LENGTH, per_device_train_batch_size=2, max_steps=2,
                    learning_rate=2e-2, lr_scheduler_type="constant", logging_steps=1, report_to=[],
                    save_strategy="no", use_cpu=True, seed=0,
                    bf16=False)  # fp32 (SFTConfig defaults to bf16: autocast on the CPU); TRL default: checkpointing on
    args = trl.SFTConfig(**{**settings, **config})
    return trl.SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                          processing_class=tok)


def _loss_pair(trainer, model, batch):
    """(TRL's loss, our native loss) for one collated batch, in training mode without gradients."""
    model.train()
    with torch.no_grad():
        trl_loss = trainer.compute_loss(model, dict(batch))
        ours = model(**{k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids",
                                                                    "labels")}).loss
    return trl_loss, ours


def _sequence_nll_sum(model, ids, labels):
    with torch.no_grad():
        logits = model(input_ids=ids[None]).logits[0, :-1].float()
    return torch.nn.functional.cross_entropy(logits, labels[1:], ignore_index=IGNORE_INDEX, reduction="sum")


def test_packing_padding_free_completion_only(tiny_smollm2_dir, gsm8k, tmp_path):
    model, tok = _model(tiny_smollm2_dir)
    rows = [{"prompt": [{"role": "user", "content": q}], "completion": [{"role": "assistant", "content": a}]}
            for q, a in gsm8k]
    trainer = _trainer(model, tok, rows, tmp_path, packing=True)  # BFD packing -> padding-free
    batch = next(iter(trainer.get_train_dataloader()))
    assert "position_ids" in batch and "attention_mask" not in batch
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist()
    assert len(starts) > 1  # several sequences share the row

    trl_loss, native = _loss_pair(trainer, model, batch)
    torch.testing.assert_close(trl_loss, native, rtol=1e-5, atol=1e-5)
    # the packed row scores like its sequences run alone (document masks from position_ids)
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    bounds = starts + [ids.numel()]
    total = sum(_sequence_nll_sum(model, ids[a:b], labels[a:b]) for a, b in zip(bounds, bounds[1:]))
    count = sum(int((labels[a + 1:b] != IGNORE_INDEX).sum()) for a, b in zip(bounds, bounds[1:]))
    with torch.no_grad():
        packed = model(input_ids=ids[None], position_ids=batch["position_ids"][:1], labels=labels[None]).loss
    torch.testing.assert_close(packed, total / count, rtol=1e-5, atol=1e-5)

    before = trl_loss
    trainer.train()
    after, _ = _loss_pair(trainer, model, batch)
    assert after < before - 0.05, (before, after)
    assert [h["loss"] for h in trainer.state.log_history if "loss" in h][-1] < before


def test_assistant_only_loss_matches_our_masks(tiny_smollm2_dir, gsm8k, tmp_path):
    model, tok = _model(tiny_smollm2_dir)
    tok.chat_template = SMOL_GENERATION_TEMPLATE  # SmolLM2's template with {% generation %} markers, as TRL needs
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in gsm8k]
    trainer = _trainer(model, tok, rows, tmp_path, packing=False, assistant_only_loss=True)
    batch = next(iter(trainer.get_train_dataloader()))
    assert "attention_mask" in batch
    for b in range(batch["input_ids"].shape[0]):
        n = int(batch["attention_mask"][b].sum())
        trl_ids, trl_labels = batch["input_ids"][b, :n].tolist(), batch["labels"][b, :n].tolist()
        ours = next(tokenize_record(r, tok, max_length=MAX_LENGTH) for r in rows
                    if tokenize_record(r, tok, max_length=MAX_LENGTH)["input_ids"] == trl_ids)
        assert ours["labels"] == trl_labels  # token by token
    trl_loss, native = _loss_pair(trainer, model, batch)
    torch.testing.assert_close(trl_loss, native, rtol=1e-5, atol=1e-5)
    trainer.train()
    after, _ = _loss_pair(trainer, model, batch)
    assert after < trl_loss


def test_padding_free_without_packing(tiny_smollm2_dir, gsm8k, tmp_path):
    model, tok = _model(tiny_smollm2_dir)
    rows = [{"prompt": q, "completion": " " + a} for q, a in gsm8k]  # standard (string) prompt-completion
    trainer = _trainer(model, tok, rows, tmp_path, padding_free=True, max_length=None)
    batch = next(iter(trainer.get_train_dataloader()))
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 1  # the 2 rows, concatenated
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist()
    assert len(starts) == 2
    ours = [tokenize_record(r, tok, max_length=None) for r in rows]
    ids = batch["input_ids"][0].tolist()
    first = next(o for o in ours if ids[: starts[1]] == o["input_ids"])  # TRL tokenized it as we do
    labels = batch["labels"][0, : starts[1]].tolist()
    assert labels[1:] == first["labels"][1:]
    trl_loss, native = _loss_pair(trainer, model, batch)
    torch.testing.assert_close(trl_loss, native, rtol=1e-5, atol=1e-5)


def test_trl_step_is_the_same_with_and_without_autocast(tiny_smollm2_dir, gsm8k, tmp_path, monkeypatch):
    """Issue 15 item 1 under TRL: a bf16 base with fp32 adapters trained by SFTTrainer without autocast (what
    ``bf16=False`` gives) and inside ``torch.autocast(bfloat16)`` (what ``bf16=True`` gives on a GPU; on the CPU
    the Trainer does not autocast, so the test enters it around ``train()``) calls the fused LoRA Functions the
    same number of times and gives bitwise the same logged losses and adapter weights after two steps: the
    kernel policy computes the adapters in the base's dtype either way. The fused path is forced on the CPU
    (the interpreter runs its Triton parts)."""
    import contextlib
    import importlib

    from pronghorn.kernels.lora_linear import LoRALinearFunction
    from pronghorn.kernels.lora_qkv import LoRAQKVFunction

    calls = []
    for name in ("lora_linear", "lora_qkv"):
        monkeypatch.setattr(importlib.import_module(f"pronghorn.kernels.{name}"), "use_triton", lambda *t: True)
    for fn in (LoRALinearFunction, LoRAQKVFunction):
        monkeypatch.setattr(fn, "apply", lambda *a, _o=fn.apply, _n=fn.__name__: calls.append(_n) or _o(*a))
    rows = [{"prompt": q, "completion": " " + a} for q, a in gsm8k[:4]]
    runs = {}
    for autocast in (False, True):
        calls.clear()
        model, tok = FastLanguageModel.from_pretrained(str(tiny_smollm2_dir), dtype=torch.bfloat16)
        model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False)
        trainer = _trainer(model, tok, rows, tmp_path / str(autocast), max_length=48)
        seen = []
        model.register_forward_pre_hook(lambda *_: seen.append(torch.is_autocast_enabled("cpu")))
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        with ctx:
            trainer.train()
        assert set(seen) == {autocast}
        losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
        weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        runs[autocast] = (losses, weights, list(calls))
    (loss_a, w_a, calls_a), (loss_b, w_b, calls_b) = runs[False], runs[True]
    assert calls_a and calls_a == calls_b
    assert loss_a == loss_b
    assert all(w.dtype == torch.float32 for w in w_a.values())
    for n, w in w_a.items():
        assert torch.equal(w, w_b[n]), n
