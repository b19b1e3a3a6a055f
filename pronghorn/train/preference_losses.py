"""Preference losses on sequence log-probs: DPO (sigmoid, IPO, hinge, robust), SimPO, ORPO, KTO.

Plain functions of per-sequence log-probs (``[B]`` tensors: the sum over a completion's trained tokens, or
the mean where a loss is length-normalised), named and parametrised as in TRL (``beta``, ``loss_type``,
``label_smoothing``, ``simpo_gamma``, ``desirable_weight`` / ``undesirable_weight``). Each returns per-example
losses (the trainer takes their mean) and the detached implicit rewards that TRL logs. Computed in fp32.

- DPO: ``delta = (pi_c - ref_c) - (pi_r - ref_r)``.
  ``sigmoid``: ``-logsigmoid(beta delta)``; with ``label_smoothing`` e > 0 the conservative cDPO mixture
  ``-(1 - e) logsigmoid(beta delta) - e logsigmoid(-beta delta)`` (TRL <= 0.28; TRL 1.x reads
  label_smoothing only for robust / exo). ``robust``: ``(-(1 - e) logsigmoid(beta delta) + e logsigmoid(-beta
  delta)) / (1 - 2e)``. ``hinge``: ``relu(1 - beta delta)``. ``ipo``: ``(delta_avg - 1 / (2 beta))^2`` with each
  log-ratio divided by its completion's token count (as TRL). Rewards: ``beta (pi - ref)``.
- SimPO (reference-free): mean log-probs, ``delta = avg_c - avg_r - gamma / beta``, sigmoid loss (with the
  same label smoothing); rewards ``beta avg`` (TRL's CPOTrainer with ``loss_type="simpo"``, cpo_alpha 0).
- ORPO: mean log-probs, ``log_odds = (avg_c - avg_r) - (log1mexp(avg_c) - log1mexp(avg_r))``, loss term
  ``-beta logsigmoid(log_odds)`` (added to the chosen NLL by the trainer); rewards ``beta avg``.
- KTO: ``kl = mean(kl_logps - ref_kl_logps)`` over mismatched (prompt, completion) pairs, detached and
  clamped at 0; desirable ``1 - sigmoid(beta (ratio - kl))``, undesirable ``1 - sigmoid(beta (kl - ratio))``,
  weighted by ``desirable_weight`` / ``undesirable_weight``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..errors import PronghornError

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "simpo")


class PreferenceLoss(NamedTuple):
    losses: torch.Tensor  # per example; the batch loss is their mean
    chosen_rewards: torch.Tensor  # detached
    rejected_rewards: torch.Tensor  # detached


def _f(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype != torch.float64 else x


def _smoothed_sigmoid(z: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    if label_smoothing == 0:
        return -F.logsigmoid(z)
    return -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


def dpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
             ref_rejected_logps: torch.Tensor, beta: float = 0.1, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0, chosen_lengths: torch.Tensor | None = None,
             rejected_lengths: torch.Tensor | None = None) -> PreferenceLoss:
    """DPO family on summed log-probs. ``ipo`` also needs the completion token counts (``*_lengths``)."""
    pc, pr, rc, rr = map(_f, (chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps))
    chosen_ratio, rejected_ratio = pc - rc, pr - rr
    delta = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = _smoothed_sigmoid(beta * delta, label_smoothing)
    elif loss_type == "robust":
        if not 0 <= label_smoothing < 0.5:
            raise PronghornError(f"robust DPO needs 0 <= label_smoothing < 0.5, got {label_smoothing}")
        losses = (-(1 - label_smoothing) * F.logsigmoid(beta * delta)
                  + label_smoothing * F.logsigmoid(-beta * delta)) / (1 - 2 * label_smoothing)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    elif loss_type == "ipo":
        if chosen_lengths is None or rejected_lengths is None:
            raise PronghornError("the ipo loss needs the completion token counts (chosen_lengths, rejected_lengths)")
        avg = chosen_ratio / chosen_lengths.clamp(min=1) - rejected_ratio / rejected_lengths.clamp(min=1)
        losses = (avg - 1 / (2 * beta)) ** 2
    else:
        raise PronghornError(f"unknown DPO loss_type {loss_type!r}; expected one of {', '.join(DPO_LOSS_TYPES)}")
    return PreferenceLoss(losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach())


def simpo_loss(chosen_avg_logps: torch.Tensor, rejected_avg_logps: torch.Tensor, beta: float = 2.0,
               simpo_gamma: float = 0.5, label_smoothing: float = 0.0) -> PreferenceLoss:
    """SimPO on length-normalised (mean per token) log-probs; no reference model."""
    pc, pr = _f(chosen_avg_logps), _f(rejected_avg_logps)
    losses = _smoothed_sigmoid(beta * (pc - pr - simpo_gamma / beta), label_smoothing)
    return PreferenceLoss(losses, beta * pc.detach(), beta * pr.detach())


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -ln 2."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(chosen_avg_logps: torch.Tensor, rejected_avg_logps: torch.Tensor,
              beta: float = 0.1) -> tuple[PreferenceLoss, torch.Tensor]:
    """ORPO's odds-ratio term on mean log-probs: (PreferenceLoss with losses = -beta logsigmoid(log_odds),
    log_odds). The full ORPO loss is the chosen NLL plus the mean of these losses."""
    pc, pr = _f(chosen_avg_logps), _f(rejected_avg_logps)
    log_odds = (pc - pr) - (log1mexp(pc) - log1mexp(pr))
    losses = -beta * F.logsigmoid(log_odds)
    return PreferenceLoss(losses, beta * pc.detach(), beta * pr.detach()), log_odds.detach()


def kto_kl(kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """KTO's reference point: mean log-ratio over mismatched pairs, detached, clamped at 0."""
    return (_f(kl_logps) - _f(ref_kl_logps)).mean().detach().clamp(min=0)


def kto_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
             ref_rejected_logps: torch.Tensor, kl: torch.Tensor, beta: float = 0.1, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0) -> PreferenceLoss:
    """KTO on summed log-probs of the desirable (``chosen``) and undesirable (``rejected``) examples of a
    batch (either may be empty); ``losses`` holds the desirable losses, then the undesirable ones."""
    chosen_ratio = _f(chosen_logps) - _f(ref_chosen_logps)
    rejected_ratio = _f(rejected_logps) - _f(ref_rejected_logps)
    chosen_losses = 1 - torch.sigmoid(beta * (chosen_ratio - kl))
    rejected_losses = 1 - torch.sigmoid(beta * (kl - rejected_ratio))
    losses = torch.cat((desirable_weight * chosen_losses, undesirable_weight * rejected_losses), 0)
    return PreferenceLoss(losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach())
