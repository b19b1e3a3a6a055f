"""GRPO on the native loop: generate, score, then optimizer steps on what was generated, on TRL's schedule.

:class:`GRPOTrainer` is the SFT :class:`~pronghorn.train.trainer.Trainer` (optimizer, schedule, checkpoints,
resume, metrics.jsonl, loss.png, progress) with its own step data and gradients. An optimizer step runs
``gradient_accumulation_steps`` micro-batches of ``batch_size`` completions. As in TRL's ``GRPOTrainer``, a
**generation batch** holds ``batch_size * steps_per_generation`` completions (``generation_batch_size``; by default
``steps_per_generation = gradient_accumulation_steps``: one generation batch per step), ``num_generations`` (G)
for each of its prompts. Counting micro-batches from the start of training, micro-batch s trains on micro-batch
``s % steps_per_generation`` of generation batch ``s // (steps_per_generation * num_iterations)``: a generation
batch is used for ``steps_per_generation / gradient_accumulation_steps`` steps, ``num_iterations`` times over.
Per generation batch:

1. **Generate** (:mod:`.grpo_rollout`): G sampled completions per prompt from the model itself, live LoRA
   adapters, CUDA-graph decoding on a GPU; then the decoder's static KV cache and graph are released, so the
   training step's memory plan has the memory back.
2. **Score** (:mod:`.grpo_rewards`): every reward function on the whole batch; weighted sum; group-relative
   advantages (:mod:`.grpo_advantages`). Then the batch is shuffled (seeded: a function of the seed and the
   batch's index, as the prompts are) and cut into micro-batches, as TRL does.
3. **Old log-probs** (only when a step may train on the batch after an optimizer step has changed the model,
   TRL's rule ``gradient_accumulation_steps % (steps_per_generation * num_iterations) != 0``; otherwise the ratio's
   value is 1 and ``logp.detach()`` stands in) and **reference log-probs** (only when ``beta > 0``: the same model
   with its adapters switched off), each without gradient, in the training forward's micro-batches.

Each micro-batch is one padding-free forward of its prompt + completion sequences through the chunked log-prob
head (:mod:`.grpo_logps`), and the loss of :mod:`.grpo_loss` as that micro-batch's share of the step (exact
accumulation): over ``batch_size * gradient_accumulation_steps`` completions, and for ``dapo`` over the loss tokens
of its generation batch times ``gradient_accumulation_steps / steps_per_generation`` (TRL's normaliser: the
step's expected share of them). With ``mask_truncated_completions`` a completion cut at ``max_completion_length``
carries no loss and is left out of the forward (its reward still counts in its group's advantages, as in TRL).

**Data-parallel** (torchrun, DDP over LoRA adapters), TRL's semantics: the generation batch is global (``batch_size
x ranks x steps_per_generation``); each rank takes its contiguous share of the batch's completions (a group may span
two ranks), samples it with its own model (seeded per rank), scores it, and the rewards of every rank are gathered
for the advantages and the metrics; the training forward goes through the DDP wrapper, ``dapo`` divides by the loss
tokens of all ranks, and the step's metrics are summed over ranks (docs/multi_gpu.md).

Logged per step (TRL's names where TRL has them): ``reward``, ``reward_std``, ``rewards/<name>/mean`` and
``/std``, ``frac_reward_zero_std``, ``completions/mean_length`` / ``min_length`` / ``max_length`` /
``clipped_ratio`` (of the generation batch the step trains on; the mean over two when a step spans two),
``entropy`` (the policy's mean token entropy over the step's loss tokens), ``kl`` (beta > 0),
``clip_ratio/low_mean`` / ``high_mean`` / ``region_mean``, and ``generation_tokens_per_s`` / ``train_tokens_per_s``
(new tokens per second of generation; packed tokens per second of the training forward and backward),
``generation_s`` / ``train_s``.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from ..data.prompts import prompt_rows
from ..errors import PronghornError
from ..infer.static_decode import live_graphs, release
from ..models.allocator import release_workspaces
from ..models.memory_plan import GIB
from .config import TrainConfig
from .distributed import all_gather_rows, all_reduce_sum
from .grpo_advantages import combine_rewards, group_advantages, nan_std
from .grpo_logps import PackedCompletions, pack_completions, packed_logps
from .grpo_loss import CLIP_METRICS, grpo_loss
from .loss_scaling import backward
from .grpo_rewards import resolve_rewards, score
from .grpo_memory import (GENERATION_WORKSPACES, TRAINING_RETRIES, generation_peak, lower_plan_target, rows_at_once,
                          sampling_copies)
from .grpo_rollout import Rollout, rollout
from .grpo_settings import generation_shape
from .optimizer_parking import StateParking
from .preference_trainer import adapters_disabled
from .rewards import reward_name
from .trainer import Trainer

RANK_SEED_STRIDE = 1_000_003  # rank r samples generation batch i from seed + i + r * stride: its own draws


@dataclass
class GenerationBatch:
    """What the steps of one generation batch train on, in training order: micro-batch k holds completions
    ``k * batch_size`` to ``(k + 1) * batch_size`` (device tensors: [N] / [N, width])."""

    rows: list[dict]  # the dataset row of each completion
    rollout: Rollout
    micro: list[PackedCompletions]  # the training forward's micro-batches
    advantages: torch.Tensor
    old_logps: torch.Tensor | None
    ref_logps: torch.Tensor | None
    metrics: dict
    loss_tokens: int  # completion tokens that carry the loss over all ranks (not those of masked truncated ones)

    def __len__(self) -> int:
        return len(self.rows)


@dataclass
class StepBatch:
    """One optimizer step's micro-batches, in order: (generation batch, micro-batch index) each."""

    parts: list[tuple[GenerationBatch, int]]
    generated: list[GenerationBatch]  # the generation batches made for this step (none when it reuses one)

    @property
    def metrics(self) -> dict:
        """The generation metrics of the batch the step trains on (the mean over two when it spans two, as TRL
        logs the mean of what was generated since its last log)."""
        batches = list({id(b): b for b, _ in self.parts}.values())
        return {k: round(sum(b.metrics[k] for b in batches) / len(batches), 6) for k in batches[0].metrics}


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
        if self.dist.strategy == "fsdp":  # generation would need every rank in every decode step
            raise PronghornError("data-parallel GRPO trains LoRA / QLoRA adapters (DDP); full fine-tuning under FSDP "
                                 "is not supported for GRPO: attach adapters (get_peft_model) or run one process")
        # generation reads a tied table (the head) on the device every token: training plans keep it there
        self.model.model.decodes_between_steps = True
        self.steps_per_generation, generation_size = generation_shape(config, self.dist.world_size)
        self.prompts_per_batch = generation_size // config.num_generations
        self.batches_per_epoch = len(rows) // self.prompts_per_batch  # an incomplete last batch is dropped (TRL)
        if not self.batches_per_epoch:
            raise PronghornError(f"a GRPO generation batch of {generation_size} completions needs "
                                 f"{self.prompts_per_batch} prompts (num_generations={config.num_generations} each); "
                                 f"the data has {len(rows)}")
        self.micro_per_batch = self.steps_per_generation * config.num_iterations  # TRL's generate_every
        ga = config.gradient_accumulation_steps
        self.keeps_old_logps = ga % self.micro_per_batch != 0  # a step may follow an update on the same batch
        self.steps_per_epoch = max(1, math.ceil(self.batches_per_epoch * self.micro_per_batch / ga))
        self.total_steps = config.max_steps or max(1, math.ceil(config.num_epochs * self.steps_per_epoch))
        self.warmup = config.warmup_steps or int(config.warmup_ratio * self.total_steps)
        self._generated: dict[int, GenerationBatch] = {}
        self._step_metrics: dict = {}

    # --- data: generation batch i every steps_per_generation * num_iterations micro-batches, from (seed, i) ---
    def batch_prompts(self, index: int) -> list[dict]:
        """The prompts of generation batch ``index`` (the epoch's shuffle, as the SFT loop's order)."""
        epoch, i = divmod(index, self.batches_per_epoch)
        order = torch.randperm(len(self.examples), generator=torch.Generator().manual_seed(self.cfg.seed + epoch))
        picked = order[i * self.prompts_per_batch:(i + 1) * self.prompts_per_batch].tolist()
        return [self.examples[j] for j in picked]

    def step_examples(self, step: int) -> StepBatch:
        """The micro-batches of optimizer step ``step`` (module docstring), generating the batches it needs."""
        ga = self.cfg.gradient_accumulation_steps
        micro_steps = range(step * ga, (step + 1) * ga)
        needed = sorted({s // self.micro_per_batch for s in micro_steps})
        self._generated = {i: b for i, b in self._generated.items() if i in needed}  # free the rest first
        generated = []
        for i in needed:
            if i not in self._generated:
                self._generated[i] = self.generate_batch(self.batch_prompts(i), seed=self.cfg.seed + i)
                generated.append(self._generated[i])
        return StepBatch([(self._generated[s // self.micro_per_batch], s % self.steps_per_generation)
                          for s in micro_steps], generated)

    # --- generation phase ---
    def local_rows(self, rows: list) -> list:
        """This rank's contiguous share of a generation batch's completions (all of them in one process), as
        accelerate splits TRL's sampler: a group may span two ranks (its rewards are gathered)."""
        n, rank = len(rows) // self.dist.world_size, self.dist.env.rank
        return rows[rank * n:(rank + 1) * n]

    def generate_batch(self, prompts: list[dict], seed: int | None = None) -> GenerationBatch:
        """Generate and score the completions of ``prompts`` (the whole generation batch's, the same on every
        rank): each rank samples its share with its own model, seeded by (``seed``, rank), no collective."""
        cfg = self.cfg
        rows = self.local_rows([p for p in prompts for _ in range(cfg.num_generations)])
        prompt_ids = [p["prompt_ids"] for p in rows]
        prompt_len = max(len(p) for p in prompt_ids)
        tokens = prompt_len + cfg.max_completion_length
        # the rank's rows are whole groups of one prompt (one process, or ranks cut at group bounds): the decoder
        # holds each group's prompt once (models/shared_prefix_cache.py)
        share = cfg.num_generations if len(prompt_ids) % cfg.num_generations == 0 else 1
        terms = (tokens, sampling_copies(cfg.top_k, cfg.top_p, cfg.min_p), share, prompt_len)
        at_once = rows_at_once(self.model, cfg.max_memory, len(prompt_ids), *terms)  # the shared budget
        tight = self.device.type == "cuda" and at_once < len(prompt_ids)
        if tight:  # more room for one round: the optimizer's state on the host, the cuBLAS workspaces freed and
            # one made again, by decoding on the decode graph's stream alone (grpo_rollout.decoding_stream)
            self.parking.park()
            self._free_between_phases()
            workspaces = 1 if not live_graphs() else GENERATION_WORKSPACES  # freed: only the decode stream's
            terms = (*terms, workspaces)
            at_once = rows_at_once(self.model, cfg.max_memory, len(prompt_ids), *terms)
        at_once = min(at_once, getattr(self, "_rows_cap", at_once))  # a round that ran out of memory before
        self.generation_estimate = dict(rows=len(prompt_ids), at_once=at_once, parked_gib=round(
            self.parking.device_bytes_parked / GIB, 3) if tight else 0.0, estimate_gib=round(generation_peak(
                self.model, cfg.max_memory, min(at_once, len(prompt_ids)), *terms) / GIB, 3))
        try:
            ro = self._rollout(prompts, prompt_ids, at_once, seed, share, one_stream=tight)
        finally:
            release(self.model)  # the decode graph's KV cache and memory pool: the training step plans without them
            if tight:
                self._free_between_phases()
                self.parking.restore()
        return self.score_batch(rows, ro, shuffle_seed=seed)

    @property
    def parking(self) -> StateParking:
        """The optimizer's state parked on the host during a generation that needs the room (optimizer_parking)."""
        if getattr(self, "_parking", None) is None or self._parking.optimizer is not self.optimizer:
            self._parking = StateParking(self.optimizer)
        return self._parking

    def _free_between_phases(self) -> None:
        """Free the cuBLAS workspaces of streams the next phase does not use and give cached blocks back, so
        that the other phase's streams can have the memory (skipped while a captured decode graph, which bakes
        a workspace in, is alive). The training step's kept adapter operands (kernels/step_operands.py) go too:
        the next training forward makes them again."""
        store = getattr(getattr(self.model, "model", None), "step_operands", None)
        if store is not None:
            store.clear()
        if not live_graphs():
            release_workspaces()
            torch.cuda.empty_cache()

    def _rollout(self, prompts: list[dict], prompt_ids: list[list[int]], at_once: int, seed: int | None,
                 share: int = 1, one_stream: bool = False) -> Rollout:
        """The rollout of ``prompt_ids``, ``at_once`` rows a round; fewer, with a warning, when a round runs out
        of memory although the estimate fit."""
        cfg = self.cfg
        while True:
            try:
                return rollout(self.model, self.tokenizer, prompt_ids, 1,
                               max_completion_length=cfg.max_completion_length, temperature=cfg.temperature,
                               top_p=cfg.top_p, top_k=cfg.top_k, min_p=cfg.min_p, stop_strings=cfg.stop_strings,
                               seed=None if seed is None else seed + RANK_SEED_STRIDE * self.dist.env.rank,
                               conversational=isinstance(prompts[0]["prompt"], list), max_rows=at_once, group=share,
                               one_stream=one_stream)
            except torch.OutOfMemoryError:
                if at_once <= 1:
                    raise
            # the estimate (grpo_memory.py) missed what was allocated: fewer rows a round. Outside the handler, whose
            # traceback still held the failed round's runner (its KV cache and graph pool), so both are freed here
            release(self.model)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            warnings.warn(f"GRPO generation ran out of memory decoding {at_once} completions at once (estimated "
                          f"to fit); decoding {at_once // 2} at once", RuntimeWarning, stacklevel=3)
            at_once //= 2
            self._rows_cap = at_once  # later generations start there: no failed round a step

    def score_batch(self, rows: list[dict], ro: Rollout, shuffle_seed: int | None = None) -> GenerationBatch:
        """Rewards, advantages, old and reference log-probs of generated completions (also the entry point for
        completions made elsewhere, e.g. a fixed batch in a test). ``shuffle_seed``: shuffle the completions
        before they are cut into micro-batches (None: keep their order). Data-parallel: ``rows`` / ``ro`` are this
        rank's share; each rank scores its own, the rewards of every rank are gathered (TRL's order: rank 0's
        first) for the groups' advantages and the metrics, and each rank keeps its share's advantages."""
        cfg = self.cfg
        local = score(self.reward_fns, rows, ro.completions, ro.completion_ids)
        n = len(rows)
        # per completion its length and truncation; the rank's new tokens and decoding seconds on its first row
        own = torch.tensor([[len(c), cut, 0.0, 0.0] for c, cut in zip(ro.completion_ids, ro.truncated)],
                           dtype=torch.float64)
        own[0, 2:] = torch.tensor([ro.tokens, ro.seconds], dtype=torch.float64)
        every = all_gather_rows(torch.cat([local.double(), own], 1), self.dist.env)  # [N, F + 4], one collective
        per_func, lengths, truncated = every[:, :-4].to(local.dtype), every[:, -4], every[:, -3]
        rewards = combine_rewards(per_func, self.reward_weights)
        advantages, std = group_advantages(rewards, cfg.num_generations, cfg.scale_rewards)
        seconds = float(every[:, -1].sum()) / self.dist.world_size  # the ranks decode at once: their mean time
        metrics = self._batch_metrics(per_func, rewards, std, lengths.float(), truncated.float(),
                                      float(every[:, -2].sum()), seconds)
        rank = self.dist.env.rank
        advantages = advantages[rank * n:(rank + 1) * n]
        if shuffle_seed is not None:  # after the groups' advantages: micro-batches (and steps) mix the groups
            order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(shuffle_seed)).tolist()
            rows, ro, advantages = [rows[i] for i in order], ro.take(order), advantages[order]
        trained = [not cut for cut in ro.truncated] if cfg.mask_truncated_completions else [True] * len(rows)
        width = max(len(c) for c in ro.completion_ids)
        bs = cfg.batch_size
        micro = [pack_completions(ro.prompt_ids[i:i + bs], ro.completion_ids[i:i + bs], width, trained[i:i + bs])
                 for i in range(0, len(rows), bs)]
        old = self.no_grad_logps(micro) if self.keeps_old_logps else None
        ref = None
        if cfg.beta != 0.0:
            with adapters_disabled(self.model):
                ref = self.no_grad_logps(micro)
        # the loss tokens of the whole generation batch (TRL's num_items), from the gathered lengths
        loss_tokens = int(lengths[truncated == 0].sum() if cfg.mask_truncated_completions else lengths.sum())
        return GenerationBatch(rows, ro, micro, advantages.to(self.device), old, ref, metrics, loss_tokens)

    @torch.no_grad()
    def no_grad_logps(self, micro: list[PackedCompletions]) -> torch.Tensor:
        with self._autocast():
            return torch.cat([packed_logps(self.model, p, self.cfg.temperature) for p in micro])

    def _batch_metrics(self, per_func: torch.Tensor, rewards: torch.Tensor, std: torch.Tensor, lengths: torch.Tensor,
                       truncated: torch.Tensor, tokens: float, seconds: float) -> dict:
        """The generation batch's metrics, from every rank's completions (``lengths`` / ``truncated`` [N])."""
        out = {}
        for j, fn in enumerate(self.reward_fns):
            out[f"rewards/{reward_name(fn)}/mean"] = torch.nanmean(per_func[:, j])
            out[f"rewards/{reward_name(fn)}/std"] = nan_std(per_func[:, j])
        out.update({"reward": torch.nanmean(rewards), "reward_std": nan_std(rewards),
                    "frac_reward_zero_std": torch.isclose(std, torch.zeros_like(std)).float().mean(),
                    "completions/mean_length": lengths.mean(), "completions/min_length": lengths.min(),
                    "completions/max_length": lengths.max(),
                    "completions/clipped_ratio": truncated.mean(),
                    "generation_tokens_per_s": torch.tensor(tokens / max(seconds, 1e-9)),
                    "generation_s": torch.tensor(seconds)})
        return {k: round(float(v), 6) for k, v in out.items()}

    # --- training phase ---
    def accumulate_gradients(self, batch: StepBatch | GenerationBatch) -> tuple[float, int]:
        """Forward and backward of a step's micro-batches (a whole :class:`GenerationBatch`: all of its
        micro-batches in one step); returns (the step's loss, packed tokens)."""
        cfg = self.cfg
        parts = batch.parts if isinstance(batch, StepBatch) else [(batch, k) for k in range(len(batch.micro))]
        sequences = cfg.batch_size * cfg.gradient_accumulation_steps
        share = cfg.gradient_accumulation_steps / self.steps_per_generation  # of a generation batch, per step
        # dapo: the generation batch's loss tokens over all ranks, per step, per rank (DDP averages over ranks)
        dapo_tokens = lambda gen: max(1, gen.loss_tokens) * share / self.dist.world_size  # noqa: E731
        total, tokens = torch.zeros((), dtype=torch.float64, device=self.device), 0
        names = ("tokens", "entropy", *CLIP_METRICS) + (("kl",) if cfg.beta != 0.0 else ())
        sums = {k: torch.zeros((), dtype=torch.float64, device=self.device) for k in names}  # 0 if nothing trains
        self._sync()
        t0 = time.perf_counter()  # the host reads below wait for the device
        for j, (gen, k) in enumerate(parts):
            packed = gen.micro[k]
            part = slice(k * cfg.batch_size, k * cfg.batch_size + packed.mask.shape[0])
            with self.dist.grad_sync(j == len(parts) - 1):  # DDP reduces the gradients once, after the last
                if not packed.tokens:  # every completion of the micro-batch is masked: no loss, no gradient
                    if self.dist.env.distributed:  # every rank joins every reduction: a zero-loss stand-in
                        self._stand_in(gen, part)
                    continue
                with self._autocast():
                    logps, entropy = self._training_logps(packed)
                mask = packed.mask.to(logps.device)
                out = grpo_loss(logps, _rows(gen.old_logps, part), _rows(gen.ref_logps, part), gen.advantages[part],
                                mask, loss_type=cfg.loss_type, beta=cfg.beta, epsilon=cfg.epsilon,
                                epsilon_high=cfg.epsilon_high, max_completion_length=cfg.max_completion_length,
                                num_sequences=sequences, num_tokens=dapo_tokens(gen),
                                use_bias_correction_kl=cfg.use_bias_correction_kl)
                backward(self.scaler, out.loss)
            tokens += packed.tokens
            total = total + out.loss.detach()
            for key, v in {**out.sums, "entropy": (entropy * mask).sum()}.items():
                sums[key] = sums[key] + v
        keys = sorted(sums)
        values = torch.stack([total] + [sums[k].double() for k in keys]).tolist()  # one host sync
        seconds = time.perf_counter() - t0
        values = all_reduce_sum(values + [tokens], self.dist.env)  # every rank's: the step's over all of them
        loss, host, tokens = values[0] / self.dist.world_size, dict(zip(keys, values[1:-1])), int(values[-1])
        count = max(1.0, host.pop("tokens"))
        step = {k: round(v / count, 6) for k, v in host.items()}
        self._step_metrics = {**batch.metrics, **step, "train_tokens_per_s": round(tokens / max(seconds, 1e-9), 1),
                              "train_s": round(seconds, 4)}
        return float(loss), tokens

    def _training_logps(self, packed: PackedCompletions) -> tuple[torch.Tensor, torch.Tensor]:
        """The training forward of one micro-batch: (log-probs, entropies). When it runs out of memory although
        its memory plan's estimate fit, the plan is made again aiming lower within the budget (grpo_memory.py) and the
        forward is run again, with a warning: exact, since nothing of this micro-batch has been accumulated yet
        (one process; with several, every rank must take the same path, so the error is raised)."""
        for attempt in range(TRAINING_RETRIES + 1):
            try:
                return packed_logps(self.model, packed, self.cfg.temperature, entropy=True, forward=self.dist.module)
            except torch.OutOfMemoryError:
                if self.dist.env.distributed or attempt == TRAINING_RETRIES:
                    raise
            except PronghornError as e:  # a retry's plan: none fits the budget now (what is resident grew)
                if attempt == 0:
                    raise
                raise PronghornError(f"GRPO's training forward ran out of memory although its memory plan estimated "
                                     f"it to fit, and no plan fits the budget now: {e}") from None
            if self.device.type == "cuda":  # outside the handler: its traceback no longer holds the forward's tensors
                release_workspaces()
                torch.cuda.empty_cache()
            failed = getattr(self.model.memory_plan, "summary", lambda: "none")()
            aim = lower_plan_target(self.model)
            warnings.warn(f"GRPO's training forward ran out of memory although its memory plan ({failed}) "
                          f"estimated it to fit; planning it again, aiming at {aim:.0%} of the budget (else the "
                          "leanest plan)", RuntimeWarning, stacklevel=2)
        raise AssertionError("unreachable")

    def _stand_in(self, gen: GenerationBatch, part: slice) -> None:
        """Forward and backward of micro-batch ``part``'s completions with a zero loss (nothing of it trains: its
        completions are masked), so that this rank takes part in the gradient reduction as the others do."""
        ro = gen.rollout
        width = max(len(c) for c in ro.completion_ids[part])
        packed = pack_completions(ro.prompt_ids[part], ro.completion_ids[part], width)
        with self._autocast():
            logps = packed_logps(self.model, packed, self.cfg.temperature, forward=self.dist.module)
        (logps.sum() * 0.0).backward()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def step_metrics(self) -> dict:
        return dict(self._step_metrics)


def _rows(t: torch.Tensor | None, part: slice) -> torch.Tensor | None:
    return None if t is None else t[part]
