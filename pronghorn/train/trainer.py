"""The native SFT training loop: AdamW, warmup + decay, exact gradient accumulation, clipping, resume."""

from __future__ import annotations

import contextlib
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..data.collate import pad_batch
from ..errors import PronghornError
from ..export.adapter import MODEL_FILES, save_adapter
from ..files import check_output_dir
from .checkpoint import list_checkpoints, load_checkpoint, prune_checkpoints, save_checkpoint
from .config import TrainConfig
from .metrics import MetricsLog
from .progress import TrainProgress
from .schedule import lr_multiplier


@dataclass
class TrainResult:
    output_dir: Path
    global_step: int
    losses: list[float]
    metrics_file: Path
    loss_plot: Path | None


def count_trained_tokens(example: dict) -> int:
    """Labels that count in the loss after the next-token shift (the first position is never predicted)."""
    return sum(1 for y in example["labels"][1:] if y != -100)


class Trainer:
    def __init__(self, model: nn.Module, tokenizer, train_examples: list[dict], config: TrainConfig,
                 base_name: str | None = None):
        if not train_examples:
            raise PronghornError("the training set is empty")
        self.model, self.tokenizer, self.examples, self.cfg = model, tokenizer, train_examples, config
        self.base_name = base_name or getattr(model, "name_or_path", None)
        self.out = Path(config.output_dir)
        self.device = next(model.parameters()).device
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise PronghornError("the model has no trainable parameters; attach LoRA with get_peft_model first")
        self.optimizer = torch.optim.AdamW(
            self.params, lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
            eps=config.adam_epsilon, weight_decay=config.weight_decay,
            **({"fused": True} if self.device.type == "cuda" else {}),
        )
        per_step = config.batch_size * config.gradient_accumulation_steps
        self.steps_per_epoch = math.ceil(len(train_examples) / per_step)
        self.total_steps = config.max_steps or max(1, math.ceil(config.num_epochs * self.steps_per_epoch))
        self.warmup = config.warmup_steps or int(config.warmup_ratio * self.total_steps)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = 0 if pad is None else pad
        compute = next((p.dtype for p in model.parameters() if not p.requires_grad), torch.float32)
        self.autocast_dtype = compute if self.device.type == "cuda" and compute != torch.float32 else None

    # --- data order: a function of (seed, step) only, so resuming needs no saved iterator ---
    def step_examples(self, step: int) -> list[dict]:
        epoch, index = divmod(step, self.steps_per_epoch)
        order = torch.randperm(len(self.examples), generator=torch.Generator().manual_seed(self.cfg.seed + epoch))
        per_step = self.cfg.batch_size * self.cfg.gradient_accumulation_steps
        return [self.examples[i] for i in order[index * per_step:(index + 1) * per_step].tolist()]

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def accumulate_gradients(self, examples: list[dict]) -> tuple[float, int]:
        """Forward/backward ``examples`` in micro-batches of ``batch_size``; every micro-batch loss is its
        token sum divided by the trained tokens of the whole accumulated batch, so the accumulated gradient
        equals that of one big batch. Returns (mean loss over those tokens, tokens seen)."""
        num_items = sum(count_trained_tokens(e) for e in examples)
        if num_items == 0:
            raise PronghornError("an optimizer step has no trainable token (all labels masked)")
        total, tokens = 0.0, 0
        for i in range(0, len(examples), self.cfg.batch_size):
            batch = pad_batch(examples[i:i + self.cfg.batch_size], self.pad_id)
            batch = {k: v.to(self.device) for k, v in batch.items()}
            tokens += int(batch["attention_mask"].sum())
            with self._autocast():
                loss = self.model(**batch, num_items_in_batch=num_items).loss
            loss.backward()
            total += float(loss.detach())
        return total, tokens

    def train_step(self, examples: list[dict]) -> tuple[float, float, int]:
        """One optimizer step; returns (loss, grad norm before clipping, tokens)."""
        loss, tokens = self.accumulate_gradients(examples)
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm or float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss, float(norm), tokens

    def _set_lr(self, step: int) -> float:
        lr = self.cfg.learning_rate * lr_multiplier(step, self.total_steps, self.warmup, self.cfg.lr_scheduler)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        return lr

    def _resume_point(self) -> Path | None:
        r = self.cfg.resume_from_checkpoint
        if not r:
            return None
        if r == "latest":
            found = list_checkpoints(self.out)
            if not found:
                raise PronghornError(f"{self.out}: no checkpoint-* directory to resume from")
            return found[-1]
        return Path(r)

    def train(self) -> TrainResult:
        cfg = self.cfg
        resume = self._resume_point()
        if resume is None:
            check_output_dir(self.out, cfg.overwrite, marker_files=MODEL_FILES + ("metrics.jsonl",))
            for old in list_checkpoints(self.out):  # only reached with overwrite=True or none present
                shutil.rmtree(old)
        self.out.mkdir(parents=True, exist_ok=True)
        log = MetricsLog(self.out / "metrics.jsonl", resume=resume is not None)
        start = 0
        if resume is not None:
            start = load_checkpoint(resume, self.model, self.optimizer)["global_step"]
            log.truncate_after(start)
        losses = [r["loss"] for r in log.rows if "loss" in r]
        self.model.train()
        with TrainProgress(self.total_steps, start, enabled=cfg.progress) as bar:
            for step in range(start, self.total_steps):
                lr = self._set_lr(step)
                t0 = time.perf_counter()
                loss, norm, tokens = self.train_step(self.step_examples(step))
                dt = time.perf_counter() - t0
                losses.append(loss)
                row = {"step": step + 1, "epoch": round((step + 1) / self.steps_per_epoch, 4), "loss": loss,
                       "lr": lr, "grad_norm": norm, "tokens": tokens, "tokens_per_s": round(tokens / dt, 1)}
                if (step + 1) % cfg.logging_steps == 0 or step + 1 == self.total_steps:
                    log.log(row)
                bar.update(step + 1, loss, lr)
                if cfg.save_steps and (step + 1) % cfg.save_steps == 0 and step + 1 < self.total_steps:
                    save_checkpoint(self.out / f"checkpoint-{step + 1}", self.model, self.optimizer,
                                    {"global_step": step + 1, "total_steps": self.total_steps}, self.base_name)
                    prune_checkpoints(self.out, cfg.save_total_limit)
        self.model.eval()
        save_adapter(self.model, self.out, self.base_name, overwrite=True)
        self.tokenizer.save_pretrained(str(self.out))
        plot = log.plot_loss(self.out / "loss.png")
        return TrainResult(self.out, self.total_steps, losses, log.path, plot)
