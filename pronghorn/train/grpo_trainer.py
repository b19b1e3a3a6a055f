"""GRPO on the native loop: generate, score, then ``num_iterations`` optimizer steps on what was generated.

:class:`GRPOTrainer` is the SFT :class:`~pronghorn.train.trainer.Trainer` (optimizer, schedule, checkpoints,
resume, metrics.jsonl, loss.png, progress) with its own step data and gradients. A step trains on
``batch_size * gradient_accumulation_steps`` completions: ``num_generations`` (G) for each of P prompts, as
TRL's ``GRPOTrainer`` with its default ``steps_per_generation`` (= gradient_accumulation_steps). Per
generation batch (every ``num_iterations`` steps):

1. **Generate** (:mod:`.grpo_rollout`): G sampled completions per prompt from the model itself, live LoRA
   adapters, CUDA-graph decoding on a GPU; then the decoder's static KV cache and graph are released, so the
   training step's memory plan has the memory back.
2. **Score** (:mod:`.grpo_rewards`): every reward function on the whole batch; weighted sum; group-relative
   advantages (:mod:`.grpo_advantages`).
3. **Old log-probs** (only when ``num_iterations > 1``, as TRL: with one step per batch the ratio's value is 1)
   and **reference log-probs** (only when ``beta > 0``: the same model with its adapters switched off), each
   without gradient, in the training forward's micro-batches.

Each step then runs the micro-batches of ``batch_size`` completions, each one padding-free forward of its
prompt + completion sequences through the chunked log-prob head (:mod:`.grpo_logps`), and the loss of
:mod:`.grpo_loss` as that micro-batch's share of the step (exact accumulation).

Logged per step (TRL's names where TRL has them): ``reward``, ``reward_std``, ``rewards/<name>/mean`` and
``/std``, ``frac_reward_zero_std``, ``completions/mean_length`` / ``min_length`` / ``max_length`` /
``clipped_ratio``, ``kl`` (beta > 0), ``clip_ratio/low_mean`` / ``high_mean`` / ``region_mean``, and
``generation_tokens_per_s`` / ``train_tokens_per_s`` (new tokens per second of generation; packed tokens per
second of the training forward and backward), ``generation_s`` / ``train_s``.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from ..data.prompts import prompt_rows
from ..errors import PronghornError
from ..infer.static_decode import release
from .config import TrainConfig
from .grpo_advantages import combine_rewards, group_advantages, nan_std
from .grpo_logps import PackedCompletions, pack_completions, packed_logps
from .grpo_loss import grpo_loss
from .grpo_rewards import resolve_rewards, score
from .grpo_memory import rows_at_once
from .grpo_rollout import Rollout, rollout
from .preference_trainer import adapters_disabled
from .rewards import reward_name
from .trainer import Trainer


@dataclass
class GenerationBatch:
    """What the steps of one generation batch train on (device tensors: [N] / [N, width])."""

    rows: list[dict]  # the dataset row of each completion
    rollout: Rollout
    micro: list[PackedCompletions]  # the training forward's micro-batches
    advantages: torch.Tensor
    old_logps: torch.Tensor | None
    ref_logps: torch.Tensor | None
    metrics: dict

    def __len__(self) -> int:
        return len(self.rows)


class GRPOTrainer(Trainer):
    def __init__(self, model: nn.Module, tokenizer, train_rows: list[dict], config: TrainConfig,
                 base_name: str | None = None):
        if config.method != "grpo":
            raise PronghornError(f"GRPOTrainer needs method='grpo', got {config.method!r}")
        self.reward_fns, self.reward_weights = resolve_rewards(config.reward_funcs, config.reward_weights)
        rows = list(train_rows)
        if rows and "prompt_ids" not in rows[0]:
            rows = prompt_rows(rows, tokenizer, config.max_prompt_length)
        super().__init__(model, tokenizer, rows, dataclasses.replace(config, packing=False), base_name)
        if self.dist.world_size > 1:
            raise PronghornError("GRPO runs in a single process for now (no torchrun)")
        completions = config.batch_size * config.gradient_accumulation_steps
        if completions % config.num_generations:
            raise PronghornError(f"batch_size * gradient_accumulation_steps = {completions} completions per step is "
                                 f"not a multiple of num_generations={config.num_generations}")
        self.prompts_per_batch = completions // config.num_generations
        self.batches_per_epoch = math.ceil(len(rows) / self.prompts_per_batch)
        self.steps_per_epoch = self.batches_per_epoch * config.num_iterations
        self.total_steps = config.max_steps or max(1, math.ceil(config.num_epochs * self.steps_per_epoch))
        self.warmup = config.warmup_steps or int(config.warmup_ratio * self.total_steps)
        self._generated: tuple[int, GenerationBatch] | None = None
        self._step_metrics: dict = {}

    # --- data: one generation batch per num_iterations steps, a function of (seed, step) only ---
    def batch_prompts(self, index: int) -> list[dict]:
        """The prompts of generation batch ``index`` (the epoch's shuffle, as the SFT loop's order)."""
        epoch, i = divmod(index, self.batches_per_epoch)
        order = torch.randperm(len(self.examples), generator=torch.Generator().manual_seed(self.cfg.seed + epoch))
        picked = order[i * self.prompts_per_batch:(i + 1) * self.prompts_per_batch].tolist()
        return [self.examples[j] for j in picked]

    def step_examples(self, step: int) -> GenerationBatch:
        index = step // self.cfg.num_iterations
        if self._generated is None or self._generated[0] != index:
            self._generated = None  # free the previous batch before generating the next
            self._generated = (index, self.generate_batch(self.batch_prompts(index), seed=self.cfg.seed + index))
        return self._generated[1]

    # --- generation phase ---
    def generate_batch(self, prompts: list[dict], seed: int | None = None) -> GenerationBatch:
        cfg, G = self.cfg, self.cfg.num_generations
        prompt_ids = [p["prompt_ids"] for p in prompts]
        tokens = max(len(p) for p in prompt_ids) + cfg.max_completion_length
        at_once = rows_at_once(self.model, cfg.max_memory, len(prompt_ids) * G, tokens)  # the shared budget
        ro = rollout(self.model, self.tokenizer, prompt_ids, G,
                     max_completion_length=cfg.max_completion_length, temperature=cfg.temperature, top_p=cfg.top_p,
                     min_p=cfg.min_p, stop_strings=cfg.stop_strings, seed=seed,
                     conversational=isinstance(prompts[0]["prompt"], list), max_rows=at_once)
        release(self.model)  # the decode graph's KV cache and memory pool: the training step plans without them
        rows = [p for p in prompts for _ in range(G)]
        return self.score_batch(rows, ro)

    def score_batch(self, rows: list[dict], ro: Rollout) -> GenerationBatch:
        """Rewards, advantages, old and reference log-probs of generated completions (also the entry point for
        completions made elsewhere, e.g. a fixed batch in a test)."""
        cfg = self.cfg
        per_func = score(self.reward_fns, rows, ro.completions, ro.completion_ids)
        rewards = combine_rewards(per_func, self.reward_weights)
        advantages, std = group_advantages(rewards, cfg.num_generations, cfg.scale_rewards)
        width = max(len(c) for c in ro.completion_ids)
        bs = cfg.batch_size
        micro = [pack_completions(ro.prompt_ids[i:i + bs], ro.completion_ids[i:i + bs], width)
                 for i in range(0, len(rows), bs)]
        old = self.no_grad_logps(micro) if cfg.num_iterations > 1 else None
        ref = None
        if cfg.beta != 0.0:
            with adapters_disabled(self.model):
                ref = self.no_grad_logps(micro)
        metrics = self._batch_metrics(per_func, rewards, std, ro)
        return GenerationBatch(rows, ro, micro, advantages.to(self.device), old, ref, metrics)

    @torch.no_grad()
    def no_grad_logps(self, micro: list[PackedCompletions]) -> torch.Tensor:
        with self._autocast():
            return torch.cat([packed_logps(self.model, p, self.cfg.temperature) for p in micro])

    def _batch_metrics(self, per_func: torch.Tensor, rewards: torch.Tensor, std: torch.Tensor, ro: Rollout) -> dict:
        lengths = torch.tensor([len(c) for c in ro.completion_ids], dtype=torch.float32)
        out = {}
        for j, fn in enumerate(self.reward_fns):
            out[f"rewards/{reward_name(fn)}/mean"] = torch.nanmean(per_func[:, j])
            out[f"rewards/{reward_name(fn)}/std"] = nan_std(per_func[:, j])
        out.update({"reward": torch.nanmean(rewards), "reward_std": nan_std(rewards),
                    "frac_reward_zero_std": torch.isclose(std, torch.zeros_like(std)).float().mean(),
                    "completions/mean_length": lengths.mean(), "completions/min_length": lengths.min(),
                    "completions/max_length": lengths.max(),
                    "completions/clipped_ratio": torch.tensor(ro.truncated, dtype=torch.float32).mean(),
                    "generation_tokens_per_s": torch.tensor(ro.tokens / max(ro.seconds, 1e-9)),
                    "generation_s": torch.tensor(ro.seconds)})
        return {k: round(float(v), 6) for k, v in out.items()}

    # --- training phase ---
    def accumulate_gradients(self, batch: GenerationBatch) -> tuple[float, int]:
        cfg = self.cfg
        n_tokens = batch.rollout.tokens
        total, tokens, sums = None, 0, {}
        self._sync()
        t0 = time.perf_counter()  # the host reads below wait for the device
        start = 0
        for packed in batch.micro:
            part = slice(start, start + packed.mask.shape[0])
            start = part.stop
            with self._autocast():
                logps = packed_logps(self.model, packed, cfg.temperature)
            out = grpo_loss(logps, _rows(batch.old_logps, part), _rows(batch.ref_logps, part),
                            batch.advantages[part], packed.mask.to(logps.device), loss_type=cfg.loss_type,
                            beta=cfg.beta, epsilon=cfg.epsilon, epsilon_high=cfg.epsilon_high,
                            max_completion_length=cfg.max_completion_length, num_sequences=len(batch),
                            num_tokens=n_tokens, use_bias_correction_kl=cfg.use_bias_correction_kl)
            out.loss.backward()
            tokens += packed.tokens
            total = out.loss.detach() if total is None else total + out.loss.detach()
            for k, v in out.sums.items():
                sums[k] = v if k not in sums else sums[k] + v
        keys = sorted(sums)
        values = torch.stack([total.double()] + [sums[k].double() for k in keys]).tolist()  # one host sync
        seconds = time.perf_counter() - t0
        loss, host = values[0], dict(zip(keys, values[1:]))
        count = max(1.0, host.pop("tokens"))
        step = {k: round(v / count, 6) for k, v in host.items()}
        self._step_metrics = {**batch.metrics, **step, "train_tokens_per_s": round(tokens / seconds, 1),
                              "train_s": round(seconds, 4)}
        return float(loss), tokens

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def step_metrics(self) -> dict:
        return dict(self._step_metrics)


def _rows(t: torch.Tensor | None, part: slice) -> torch.Tensor | None:
    return None if t is None else t[part]
