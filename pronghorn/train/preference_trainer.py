"""Preference training (DPO and its IPO / hinge / robust / SimPO variants, ORPO, KTO) on the native loop.

:class:`PreferenceTrainer` is the SFT :class:`~pronghorn.train.trainer.Trainer` (optimizer, schedule, exact
accumulation, checkpoints, resume, metrics.jsonl, progress) with another ``accumulate_gradients``:

- **One forward for both sides.** A micro-batch of B pairs is one padded batch of 2B rows, chosen then rejected
  (:func:`~pronghorn.data.preference_collate.collate_preference`).
- **No logits.** Per-token log-probs come from the final hidden states and the lm_head weight through the
  chunked :func:`~pronghorn.kernels.linear_logprobs.linear_logprobs`; the [tokens x vocab] logits never exist.
- **No reference copy.** The reference is the same model with its LoRA adapters switched off, run under
  ``no_grad`` (or a ``ref_model`` given explicitly, e.g. for full fine-tuning). With
  ``precompute_ref_log_probs`` it is run once over the dataset before training and stored per row. It runs
  before the policy's forward, so its activations and logits chunks never add to the policy's saved ones.
- **Exact accumulation.** Each micro-batch adds ``sum(per-pair losses) / pairs in the optimizer step`` (ORPO's
  NLL: ``-sum(chosen token log-probs) / chosen tokens in the step``), so the accumulated gradient equals one big
  batch's. KTO's KL reference point is estimated per micro-batch, as TRL does per device batch.

Logged per step (means over the step's pairs, TRL's names): ``rewards/chosen``, ``rewards/rejected``,
``rewards/margins``, ``rewards/accuracies`` (strictly chosen > rejected; not for KTO), ``logps/chosen``,
``logps/rejected`` (summed over the completion; ORPO / SimPO: per-token means, what their losses use), plus
``nll_loss`` / ``log_odds_ratio`` (ORPO) and ``kl`` (KTO).
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..data.collate import batch_to_device
from ..data.preference_collate import add_kl_completions, collate_kto, collate_preference
from ..errors import PronghornError
from ..kernels import IGNORE_INDEX
from ..models.decoder import DecoderForCausalLM
from ..models.lora import set_lora_enabled
from .config import TrainConfig
from .distributed import FILLER, all_reduce_sum, env_from_os
from .loss_scaling import backward
from .preference_losses import DPO_LOSS_TYPES, dpo_loss, kto_kl, kto_loss, orpo_loss, simpo_loss
from .trainer import Trainer

METHODS = ("dpo", "orpo", "kto")


def completion_logps(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log-probs of each row's labelled tokens (fp32), their count) for a batch with unshifted
    ``labels``. A pronghorn model (or a DDP wrapper of one) is called once with ``return_token_logps``: no
    logits, and the wrapper sees the forward; any other causal LM goes through its logits. Optional
    ``keep_rows``: the flat indices of the labelled tokens after the shift (see :func:`device_batch`)."""
    shifted = F.pad(batch["labels"], (0, 1), value=IGNORE_INDEX)[:, 1:]
    if isinstance(getattr(model, "module", model), DecoderForCausalLM):
        tok = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), labels=batch["labels"],
                    return_token_logps=True, keep_rows=batch.get("keep_rows"))["token_logps"]
    else:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
        keep = shifted != IGNORE_INDEX
        tok = logits.float().log_softmax(-1).gather(-1, shifted.clamp(min=0).unsqueeze(-1)).squeeze(-1) * keep
    return tok.sum(-1), (shifted != IGNORE_INDEX).sum(-1)


def device_batch(batch: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor | None]:
    """A collated host batch on ``device`` with ``keep_rows`` (the flat indices of the labelled tokens after the
    shift) computed on the host: the log-prob head then needs no host sync to count them
    (:func:`~pronghorn.data.collate.batch_to_device` moves it; an all-ones attention mask becomes None)."""
    shifted = F.pad(batch["labels"], (0, 1), value=IGNORE_INDEX)[:, 1:]
    keep_rows = (shifted.reshape(-1) != IGNORE_INDEX).nonzero().squeeze(-1)
    return batch_to_device({**batch, "keep_rows": keep_rows}, device)


def _on_host(sums: dict) -> dict[str, float]:
    """Metric sums as floats, the device ones in one transfer (one host sync)."""
    keys = [k for k, v in sums.items() if isinstance(v, torch.Tensor)]
    host = dict(zip(keys, torch.stack([sums[k].detach().float().reshape(()) for k in keys]).tolist())) if keys else {}
    return {k: host[k] if k in host else float(v) for k, v in sums.items()}


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """The base model inside the block: our LoRA switched off, or a PEFT model's ``disable_adapter()``."""
    if getattr(model, "lora_config", None) is not None:
        set_lora_enabled(model, False)
        try:
            yield model
        finally:
            set_lora_enabled(model, True)
    elif hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            yield model
    else:
        raise PronghornError("a reference is needed but the model has no adapter to disable; attach LoRA, pass "
                             "ref_model=, or use a reference-free loss (method='orpo', loss_type='simpo')")


class PreferenceTrainer(Trainer):
    def __init__(self, model: nn.Module, tokenizer, train_rows: list[dict], config: TrainConfig,
                 base_name: str | None = None, ref_model: nn.Module | None = None):
        if config.method not in METHODS:
            raise PronghornError(f"PreferenceTrainer needs method dpo, orpo or kto, got {config.method!r}")
        if config.method == "dpo" and config.loss_type not in DPO_LOSS_TYPES:
            raise PronghornError(f"loss_type {config.loss_type!r} is not one of {', '.join(DPO_LOSS_TYPES)}")
        # KTO's mismatched KL pairs are drawn within blocks of the global micro-batch (every rank's micro-batch
        # together), so 2 ranks x batch B pair the same rows as 1 rank x batch 2B
        block = config.batch_size * env_from_os().world_size
        rows = add_kl_completions(train_rows, block) if config.method == "kto" else list(train_rows)
        super().__init__(model, tokenizer, rows, config, base_name)
        self.ref_model = ref_model
        self.uses_reference = config.method == "kto" or (config.method == "dpo" and config.loss_type != "simpo")
        self._step_metrics: dict = {}
        if self.uses_reference and config.precompute_ref_log_probs:
            self.examples = self.precompute_reference(self.examples)

    # --- forward passes ---
    def _batch(self, rows: list[dict]) -> dict:
        if self.cfg.method == "kto":
            batch, kl = collate_kto(rows, self.pad_id)
            return {"main": self._to(batch), "kl": self._to(kl)}
        return {"main": self._to(collate_preference(rows, self.pad_id))}

    def _to(self, batch: dict) -> dict:
        return device_batch(batch, self.device)

    def _tensor(self, values: list, dtype=torch.float32) -> torch.Tensor:
        """Host values on the device without a sync (pinned, non-blocking)."""
        return batch_to_device({"t": torch.tensor(values, dtype=dtype)}, self.device)["t"]

    @torch.no_grad()
    def _reference_logps(self, batch: dict) -> dict[str, torch.Tensor]:
        ctx = contextlib.nullcontext(self.ref_model) if self.ref_model is not None else adapters_disabled(self.model)
        with ctx as ref, self._autocast():
            return {k: completion_logps(ref, b)[0] for k, b in batch.items()}

    def precompute_reference(self, rows: list[dict]) -> list[dict]:
        """Copies of ``rows`` with the reference's log-probs stored (one pass, batches of ``batch_size``)."""
        out = []
        for i in range(0, len(rows), self.cfg.batch_size):
            chunk = rows[i:i + self.cfg.batch_size]
            ref = {k: v.tolist() for k, v in self._reference_logps(self._batch(chunk)).items()}
            n = len(chunk)
            for j, r in enumerate(chunk):
                if self.cfg.method == "kto":
                    extra = {"ref_logps": ref["main"][j], "ref_kl_logps": ref["kl"][j]}
                else:
                    extra = {"ref_chosen_logps": ref["main"][j], "ref_rejected_logps": ref["main"][n + j]}
                out.append({**r, **extra})
        return out

    def _stored_or_computed_reference(self, rows: list[dict], batch: dict) -> dict[str, torch.Tensor]:
        if self.cfg.method == "kto" and all("ref_logps" in r for r in rows):
            return {"main": self._tensor([r["ref_logps"] for r in rows]),
                    "kl": self._tensor([r["ref_kl_logps"] for r in rows])}
        if self.cfg.method != "kto" and all("ref_chosen_logps" in r for r in rows):
            vals = [r["ref_chosen_logps"] for r in rows] + [r["ref_rejected_logps"] for r in rows]
            return {"main": self._tensor(vals)}
        return self._reference_logps(batch)

    # --- one micro-batch: (loss to backpropagate, metric sums: 0-dim device tensors or host numbers) ---
    def micro_batch_loss(self, rows: list[dict], num_rows: float, num_chosen_tokens: float,
                         counted: bool = True) -> tuple[torch.Tensor, dict]:
        """``num_rows`` / ``num_chosen_tokens``: the step's pairs (ORPO: chosen tokens) over all ranks, divided by
        the world size (gradients are averaged over ranks). ``counted=False``: a stand-in micro-batch of a rank
        that ran out of rows; it still runs forward and backward (every rank joins every gradient reduction)
        but takes no part in KTO's KL estimate; the caller zeroes its loss."""
        cfg = self.cfg
        batch = self._batch(rows)
        # forwards without gradient first (reference; KTO's KL pairs, in TRL's order): their transient
        # activations and logits chunks then never coexist with the policy's saved activations
        ref = self._stored_or_computed_reference(rows, batch) if self.uses_reference else None
        if cfg.method == "kto":
            with torch.no_grad(), self._autocast():
                kl_logps = completion_logps(self.model, batch["kl"])[0]
        with self._autocast():  # through the DDP / FSDP wrapper, if any: it sees the forward
            logps, counts = completion_logps(self.dist.module, batch["main"])
        stats: dict = {}
        if cfg.method == "kto":  # rows split by label with host-made indices (a boolean mask would sync)
            label = [bool(r["label"]) for r in rows]
            pos = self._tensor([j for j, good in enumerate(label) if good], torch.long)
            neg = self._tensor([j for j, good in enumerate(label) if not good], torch.long)
            kl = self._kto_kl(kl_logps, ref["kl"], counted)
            out = kto_loss(logps[pos], logps[neg], ref["main"][pos], ref["main"][neg], kl, cfg.beta,
                           cfg.desirable_weight, cfg.undesirable_weight)
            loss = out.losses.sum() / num_rows
            stats.update({"kl": kl.detach() * len(rows), "n_chosen": sum(label),
                          "n_rejected": len(label) - sum(label), "rewards/chosen": out.chosen_rewards.sum(),
                          "rewards/rejected": out.rejected_rewards.sum(),
                          "logps/chosen": logps[pos].detach().sum(), "logps/rejected": logps[neg].detach().sum()})
            return loss, stats
        b = len(rows)
        chosen, rejected = logps[:b], logps[b:]
        n_c, n_r = counts[:b], counts[b:]
        if cfg.method == "orpo" or cfg.loss_type == "simpo":
            chosen, rejected = chosen / n_c.clamp(min=1), rejected / n_r.clamp(min=1)  # per-token means
        if cfg.method == "orpo":
            out, log_odds = orpo_loss(chosen, rejected, cfg.beta)
            nll = -logps[:b].sum() / num_chosen_tokens
            loss = out.losses.sum() / num_rows + nll
            stats.update({"nll_loss": nll.detach() * num_rows, "log_odds_ratio": F.logsigmoid(log_odds).sum(),
                          "log_odds_chosen": log_odds.sum()})
        elif cfg.loss_type == "simpo":
            out = simpo_loss(chosen, rejected, cfg.beta, cfg.simpo_gamma, cfg.label_smoothing)
            loss = out.losses.sum() / num_rows
        else:
            ref = ref["main"]
            out = dpo_loss(chosen, rejected, ref[:b], ref[b:], cfg.beta, cfg.loss_type, cfg.label_smoothing, n_c, n_r)
            loss = out.losses.sum() / num_rows
        margins = out.chosen_rewards - out.rejected_rewards
        stats.update({"rewards/chosen": out.chosen_rewards.sum(), "rewards/rejected": out.rejected_rewards.sum(),
                      "rewards/margins": margins.sum(), "rewards/accuracies": (margins > 0).sum(),
                      "logps/chosen": chosen.detach().sum(), "logps/rejected": rejected.detach().sum()})
        return loss, stats

    def _kto_kl(self, kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor, counted: bool) -> torch.Tensor:
        """KTO's reference point over the global micro-batch: averaged over every rank's rows (as TRL gathers
        it), one host sync per micro-batch when there are several ranks."""
        if not self.dist.env.distributed:
            return kto_kl(kl_logps, ref_kl_logps)
        diff = float((kl_logps.float() - ref_kl_logps.float()).sum()) if counted else 0.0
        total, n = all_reduce_sum([diff, len(kl_logps) if counted else 0], self.dist.env)
        return torch.tensor(max(total / max(n, 1), 0.0), device=kl_logps.device)

    def accumulate_gradients(self, examples: list[dict]) -> tuple[float, int]:
        """This rank's share of a step (``FILLER`` rows pad a short share, see train/distributed.py): each
        micro-batch adds sum(per-pair losses) / (the step's pairs over all ranks / world size), so the gradient
        averaged over ranks equals one big batch's."""
        real = [r for r in examples if r is not FILLER]
        num_rows = self.dist.loss_normalizer(len(real))
        num_chosen_tokens = self.dist.loss_normalizer(sum(sum(r.get("chosen_mask", ())) for r in real)) or 1
        tokens, sums = 0, defaultdict(float)  # summed on the device: one host sync per step
        for i in range(0, len(examples), self.cfg.batch_size):
            rows = [r for r in examples[i:i + self.cfg.batch_size] if r is not FILLER]
            counted = bool(rows)
            with self.dist.grad_sync(i + self.cfg.batch_size >= len(examples)):
                loss, stats = self.micro_batch_loss(rows if counted else self.examples[:1], num_rows,
                                                    num_chosen_tokens, counted)
                if not counted:  # a filler micro-batch: zero loss and statistics, same reductions
                    loss, stats = loss * 0.0, {k: v * 0 for k, v in stats.items()}
                backward(self.scaler, loss)
            tokens += sum(len(r["prompt_ids"]) * (1 if self.cfg.method == "kto" else 2)
                          + len(r.get("completion_ids", ())) + len(r.get("chosen_ids", ()))
                          + len(r.get("rejected_ids", ())) for r in rows)
            for k, v in {**stats, "loss": loss.detach()}.items():
                sums[k] = sums[k] + v
        sums = _on_host(sums)
        sums["tokens"] = tokens
        if self.dist.env.distributed:  # every rank's sums, in one reduction (the same keys on every rank)
            keys = sorted(sums)
            sums = dict(zip(keys, all_reduce_sum([sums[k] for k in keys], self.dist.env)))
            sums["loss"] /= self.dist.world_size
        total, tokens = sums.pop("loss"), int(sums.pop("tokens"))
        self._step_metrics = self._means(sums, round(num_rows * self.dist.world_size))
        return total, tokens

    def _means(self, sums: dict, num_rows: int) -> dict:
        if self.cfg.method != "kto":
            return {k: round(v / num_rows, 6) for k, v in sums.items()}
        nc, nr = sums.pop("n_chosen"), sums.pop("n_rejected")
        out = {"kl": round(sums.pop("kl") / num_rows, 6)}
        for side, n in (("chosen", nc), ("rejected", nr)):
            if n:
                out[f"rewards/{side}"] = round(sums[f"rewards/{side}"] / n, 6)
                out[f"logps/{side}"] = round(sums[f"logps/{side}"] / n, 6)
        if nc and nr:
            out["rewards/margins"] = round(out["rewards/chosen"] - out["rewards/rejected"], 6)
        return out

    def step_metrics(self) -> dict:
        return dict(self._step_metrics)

    @torch.no_grad()
    def evaluate(self, rows: list[dict]) -> dict:
        """Loss and reward metrics of held-out rows (no gradient, model in eval mode, then restored)."""
        was_training = self.model.training
        self.model.eval()
        try:
            if self.cfg.method == "kto":
                rows = add_kl_completions(rows, self.cfg.batch_size)
            num_chosen_tokens = max(1, sum(sum(r.get("chosen_mask", ())) for r in rows))
            sums = defaultdict(float)
            for i in range(0, len(rows), self.cfg.batch_size):
                loss, stats = self.micro_batch_loss(rows[i:i + self.cfg.batch_size], len(rows), num_chosen_tokens)
                for k, v in {**stats, "loss": loss}.items():
                    sums[k] = sums[k] + v
            sums = _on_host(sums)
            total = sums.pop("loss")
            return {"loss": total, **self._means(sums, len(rows))}
        finally:
            self.model.train(was_training)
