"""The native SFT training loop: AdamW (train/optimizers.py), warmup + decay, exact gradient accumulation,
clipping, resume; with ``packing`` the examples are packed once into padding-free rows (data/packing.py) and
the steps draw rows, the model keeping the sequences of a row apart by their restarting ``position_ids``.
``data_format="raw_text"`` examples are documents, cut into ``max_length`` blocks the same way
(data/raw_text.py). With held-out data (train/held_out.py) the loop logs ``eval_loss`` / ``eval_perplexity``
every ``eval_steps`` steps and after the last (train/evaluate.py)."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..data.collate import batch_to_device, count_trained_tokens, pad_batch, padding_id
from ..data.formats import RAW_TEXT
from ..data.packing import collate_packed, pack_examples
from ..data.raw_text import chunk_documents
from ..errors import PronghornError
from ..export.adapter import MODEL_FILES, save_adapter
from ..files import check_output_dir
from ..models.lora import trained_modules
from .checkpoint import list_checkpoints, load_checkpoint, prune_checkpoints, save_checkpoint
from .config import TrainConfig
from .distributed import DataParallel
from .full_finetune import optimizer_footprint, resolve_optim
from .evaluate import evaluate_examples
from .held_out import held_out_examples
from .loss_scaling import backward, clip_and_step, load_scaler_state, loss_scaler, scaler_state
from .optimizers import build_optimizer
from .progress import TrainProgress
from .report import open_reporter
from .step_in_backward import StepInBackward, check_step_in_backward
from .sharded_checkpoint import load_sharded_checkpoint, save_sharded_checkpoint
from .schedule import lr_multiplier


@dataclass
class TrainResult:
    output_dir: Path
    global_step: int
    losses: list[float]
    metrics_file: Path
    loss_plot: Path | None
    eval_metrics: dict | None = None  # the last evaluation's metrics row (step, eval_loss, eval_perplexity, ...)


class Trainer:
    def __init__(self, model: nn.Module, tokenizer, train_examples: list[dict], config: TrainConfig,
                 base_name: str | None = None, eval_examples: list[dict] | None = None):
        """``eval_examples``: tokenized held-out rows (None: from ``eval_data`` / ``eval_split``, if set)."""
        if not train_examples:
            raise PronghornError("the training set is empty")
        self.model, self.tokenizer, self.examples, self.cfg = model, tokenizer, train_examples, config
        self.base_name = base_name or getattr(model, "name_or_path", None)
        self.out = Path(config.output_dir)
        self.dist = DataParallel(model, config.distributed)  # one process: a no-op; see train/distributed.py
        device = getattr(model, "device", None)  # not the first parameter: an offloaded embedding is on the host
        self.device = device if isinstance(device, torch.device) else next(model.parameters()).device
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise PronghornError("the model has no trainable parameters; attach LoRA with get_peft_model first (or "
                                 "load it with full_finetuning=True)")
        self.full_finetuning = getattr(model, "lora_config", None) is None  # sharded (DCP) checkpoints
        if config.max_memory is not None and hasattr(model, "set_memory_budget"):
            model.set_memory_budget(config.max_memory)  # the training step plans for it (as get_peft_model's)
        self.optimizer = self._build_optimizer()
        if eval_examples is None:
            train_examples, eval_examples = held_out_examples(config, tokenizer, train_examples)
        self.packed = config.packing or config.data_format == RAW_TEXT
        self.examples = self._rows(train_examples)
        self.eval_examples = self._rows(eval_examples) if eval_examples else None
        per_step = config.batch_size * config.gradient_accumulation_steps * self.dist.world_size
        self.steps_per_epoch = math.ceil(len(self.examples) / per_step)
        self.total_steps = config.max_steps or max(1, math.ceil(config.num_epochs * self.steps_per_epoch))
        self.warmup = config.warmup_steps or int(config.warmup_ratio * self.total_steps)
        self.pad_id = padding_id(tokenizer)
        compute = next((p.dtype for p in model.parameters() if not p.requires_grad and p.is_floating_point()),
                       torch.float32)
        self.autocast_dtype = compute if self.device.type == "cuda" and compute != torch.float32 else None
        self.scaler = loss_scaler(self.device, self.autocast_dtype, config.optimizer_in_backward, self.params)

    def _build_optimizer(self):
        """``optim`` over the trained parameters; with ``optimizer_in_backward`` one per parameter, stepped in the
        backward pass (train/step_in_backward.py); full fine-tuning of bf16 weights: train/full_finetune.py."""
        cfg = self.cfg
        name = resolve_optim(cfg.optim, self.params, self.dist.world_size) if self.full_finetuning else cfg.optim
        if name != cfg.optim and self.dist.is_main:
            print(f"pronghorn: full fine-tuning of bfloat16 weights: optim {name} (fp32 moments, stochastic "
                  f"rounding) for the default {cfg.optim}; optim='adamw_torch' keeps torch's AdamW", flush=True)

        def build(groups, first_index: int = 0):
            return build_optimizer(groups, name, cfg.learning_rate, (cfg.adam_beta1, cfg.adam_beta2),
                                   cfg.adam_epsilon, cfg.weight_decay, self.device, seed=cfg.seed,
                                   first_index=first_index)

        decoder = getattr(self.model, "model", None)
        if hasattr(decoder, "optimizer_footprint"):  # the memory plan counts what this optimizer holds
            decoder.optimizer_footprint = optimizer_footprint(name, cfg.optimizer_in_backward, self.full_finetuning)
            decoder.optimizer_state_allocated = False  # until the first step (train_step)
        if not cfg.optimizer_in_backward:
            return build(self._param_groups())
        check_step_in_backward(cfg.gradient_accumulation_steps, cfg.max_grad_norm, self.dist.world_size)
        return StepInBackward(self._param_groups(), build)

    def _rows(self, examples: list[dict]) -> list[dict]:
        """What the steps draw: raw-text documents cut into blocks, packed rows (padding-free: whole sequences in
        rows of max_length tokens, each with its positions), or the examples as they are."""
        if self.cfg.data_format == RAW_TEXT:
            return chunk_documents(examples, self.cfg.max_length)
        return pack_examples(examples, self.cfg.max_length) if self.cfg.packing else examples

    def _param_groups(self) -> list[dict]:
        """The adapters at ``learning_rate``; embed_tokens / lm_head trained fully (``target_modules`` named them,
        or add_new_tokens) at ``embedding_learning_rate`` (Unsloth's name; None: ``learning_rate``). Each group's
        ``peak_lr`` is what the schedule scales."""
        cfg = self.cfg
        full_tables = ["embed_tokens", "lm_head"] if self.full_finetuning and cfg.embedding_learning_rate else None
        tables = {id(p) for _, p in trained_modules(self.model, full_tables)}
        groups = [{"params": [p for p in self.params if id(p) not in tables], "peak_lr": cfg.learning_rate}]
        embed = [p for p in self.params if id(p) in tables]
        if embed:
            lr = cfg.embedding_learning_rate or cfg.learning_rate
            groups.append({"params": embed, "peak_lr": lr})
            if self.dist.is_main:
                print(f"pronghorn: embed_tokens / lm_head train fully at learning rate {lr:g} ("
                      f"{'other weights' if self.full_finetuning else 'adapters'}: {cfg.learning_rate:g})", flush=True)
        elif cfg.embedding_learning_rate is not None:
            raise PronghornError("embedding_learning_rate is set but embed_tokens / lm_head do not train; add them "
                                 "to target_modules (CLI: --target-modules ... embed_tokens lm_head)")
        return [g for g in groups if g["params"]]

    # --- data order: a function of (seed, step) only, so resuming needs no saved iterator ---
    def step_examples(self, step: int) -> list[dict]:
        epoch, index = divmod(step, self.steps_per_epoch)
        order = torch.randperm(len(self.examples), generator=torch.Generator().manual_seed(self.cfg.seed + epoch))
        per_step = self.cfg.batch_size * self.cfg.gradient_accumulation_steps * self.dist.world_size
        step = [self.examples[i] for i in order[index * per_step:(index + 1) * per_step].tolist()]
        return self.dist.shard(step, self.cfg.batch_size)  # this rank's share (all of it in one process)

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def accumulate_gradients(self, examples: list[dict]) -> tuple[float, int]:
        """Forward/backward ``examples`` in micro-batches of ``batch_size``; every micro-batch loss is its
        token sum divided by the trained tokens of the whole accumulated batch, so the accumulated gradient
        equals that of one big batch. Returns (mean loss over those tokens, tokens seen)."""
        num_items = self.dist.loss_normalizer(sum(count_trained_tokens(e) for e in examples))
        if num_items == 0:
            raise PronghornError("an optimizer step has no trainable token (all labels masked)")
        total, tokens = None, 0  # summed on the device: one host sync per step, not per micro-batch
        for i in range(0, len(examples), self.cfg.batch_size):
            chunk = examples[i:i + self.cfg.batch_size]
            batch = collate_packed(chunk, self.pad_id) if self.packed else pad_batch(chunk, self.pad_id)
            batch = batch_to_device(batch, self.device)
            tokens += sum(len(e["input_ids"]) for e in chunk)
            with self._autocast(), self.dist.grad_sync(i + self.cfg.batch_size >= len(examples)):
                loss = self.dist.forward(**batch, num_items_in_batch=num_items).loss
            backward(self.scaler, loss)
            total = loss.detach() if total is None else total + loss.detach()
        return self.dist.reduce_stats(float(total), tokens)

    def step_metrics(self) -> dict:
        """Extra values for the metrics row of the step just taken (none here; subclasses add theirs)."""
        return {}

    def train_step(self, examples: list[dict]) -> tuple[float, float, int]:
        """One optimizer step; returns (loss, grad norm before clipping, tokens)."""
        loss, tokens = self.accumulate_gradients(examples)
        decoder = getattr(self.model, "model", None)
        if hasattr(decoder, "optimizer_state_allocated"):  # later plans find the optimizer's state resident
            decoder.optimizer_state_allocated = True
        if isinstance(self.optimizer, StepInBackward):  # every weight stepped in the backward pass
            return loss, self.optimizer.grad_norm(), tokens
        norm = clip_and_step(self.scaler, self.optimizer, self.params, self.cfg.max_grad_norm)
        return loss, norm, tokens

    def evaluate_held_out(self) -> dict:
        """Loss and perplexity on the held-out rows (every rank runs the same batches: an FSDP forward takes
        all ranks)."""
        with self._autocast():
            result = evaluate_examples(self.model, self.eval_examples, self.cfg.eval_batch_size or self.cfg.batch_size,
                                       self.pad_id, forward=self.dist.forward, device=self.device)
        return result.metrics()

    def _log_evaluation(self, step: int, log, report, bar) -> dict:
        row = {"step": step, **self.evaluate_held_out()}
        log.log(row)
        if report is not None:
            report.log(row)
        bar.note(f"step {step}: eval_loss {row['eval_loss']:.4f}  eval_perplexity {row['eval_perplexity']:.3f}")
        return row

    def _set_lr(self, step: int) -> float:
        scale = lr_multiplier(step, self.total_steps, self.warmup, self.cfg.lr_scheduler)
        for g in self.optimizer.param_groups:
            g["lr"] = g.get("peak_lr", self.cfg.learning_rate) * scale
        return self.cfg.learning_rate * scale

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

    def _save_checkpoint(self, step: int) -> None:
        state = {"global_step": step, "total_steps": self.total_steps, **scaler_state(self.scaler)}
        path = self.out / f"checkpoint-{step}"
        if self.full_finetuning:  # every rank writes its shards (train/sharded_checkpoint.py)
            save_sharded_checkpoint(path, self.model, self.optimizer, state)
        elif self.dist.is_main:
            save_checkpoint(path, self.model, self.optimizer, state, self.base_name)
        if self.dist.is_main:
            prune_checkpoints(self.out, self.cfg.save_total_limit)

    def _save_full_model(self) -> None:
        """Full fine-tuning: the whole model as a Hugging Face checkpoint (config.json, safetensors shards,
        tokenizer) in ``output_dir``, gathered from the ranks' shards onto rank 0's host."""
        from ..export.merged import save_merged
        from .fsdp_gather import gathered

        with gathered(self.model) as model:
            if model is None:
                return
            tmp = self.out / ".model.tmp"
            save_merged(model, tmp, self.tokenizer, overwrite=True)
            for f in sorted(tmp.iterdir()):  # next to metrics.jsonl and the checkpoints, one file at a time
                os.replace(f, self.out / f.name)
            tmp.rmdir()

    def train(self) -> TrainResult:
        cfg = self.cfg
        resume = self._resume_point()
        if resume is None:
            check_output_dir(self.out, cfg.overwrite, marker_files=MODEL_FILES + ("metrics.jsonl",))
            for old in list_checkpoints(self.out) if self.dist.is_main else []:  # overwrite=True or none there
                shutil.rmtree(old)
        self.out.mkdir(parents=True, exist_ok=True)
        log = self.dist.metrics_log(self.out / "metrics.jsonl", resume=resume is not None)  # rank 0 writes
        start = 0
        if resume is not None:
            load = load_sharded_checkpoint if self.full_finetuning else load_checkpoint
            state = load(resume, self.model, self.optimizer)
            load_scaler_state(self.scaler, state)
            start = state["global_step"]
            log.truncate_after(start)
        losses = [r["loss"] for r in log.rows if "loss" in r]
        report = open_reporter(cfg.report_to if self.dist.is_main else "none", self.out, dataclasses.asdict(cfg))
        self.model.train()
        evaluation = None
        with TrainProgress(self.total_steps, start, enabled=cfg.progress and self.dist.is_main) as bar, \
                contextlib.closing(report or _Nothing()):
            if self.eval_examples and cfg.eval_on_start and start == 0:
                evaluation = self._log_evaluation(0, log, report, bar)
            for step in range(start, self.total_steps):
                lr = self._set_lr(step)
                t0 = time.perf_counter()
                loss, norm, tokens = self.train_step(self.step_examples(step))
                dt = time.perf_counter() - t0
                losses.append(loss)
                row = {"step": step + 1, "epoch": round((step + 1) / self.steps_per_epoch, 4), "loss": loss,
                       "lr": lr, "grad_norm": norm, "tokens": tokens, "tokens_per_s": round(tokens / dt, 1)}
                row.update(self.step_metrics())  # hook: subclasses add their own (preference rewards, ...)
                if (step + 1) % cfg.logging_steps == 0 or step + 1 == self.total_steps:
                    log.log(row)
                    if report is not None:
                        report.log(row)
                bar.update(step + 1, loss, lr)
                done = step + 1 == self.total_steps
                if self.eval_examples and (done or (cfg.eval_steps and (step + 1) % cfg.eval_steps == 0)):
                    evaluation = self._log_evaluation(step + 1, log, report, bar)
                if cfg.save_steps and (step + 1) % cfg.save_steps == 0 and step + 1 < self.total_steps:
                    self._save_checkpoint(step + 1)
        self.model.eval()
        if self.full_finetuning:
            self._save_full_model()
        elif self.dist.is_main:
            save_adapter(self.model, self.out, self.base_name, overwrite=True)
            self.tokenizer.save_pretrained(str(self.out))
        plot = log.plot_loss(self.out / "loss.png")
        return TrainResult(self.out, self.total_steps, losses, log.path, plot, evaluation)


class _Nothing:
    def close(self) -> None:
        pass
