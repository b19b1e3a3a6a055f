"""GRPO's per-token objective and its aggregations over an optimizer step (TRL 1.16's definitions).

For completion token t of completion i (completion mask m_it), with the policy's log-prob ``logp``, the
log-prob ``old`` of the policy that generated the batch (``logp.detach()`` when each batch is used for one
step: the ratio is then 1 but its gradient is not), the reference's ``ref`` and the completion's advantage A_i::

    r_it   = exp(logp_it - old_it)
    pg_it  = -min(r_it * A_i, clamp(r_it, 1 - epsilon, 1 + epsilon_high) * A_i)
    kl_it  = exp(ref_it - logp_it) - (ref_it - logp_it) - 1          (k3 estimator; only when beta > 0)
             times r_it with ``use_bias_correction_kl`` (TRL's default: the unbiased reverse-KL gradient;
             r_it is differentiable, so this changes the gradient even where r_it = 1)
    l_it   = pg_it + beta * kl_it

and the loss of a step of B completions holding N completion tokens::

    grpo     (1 / B) * sum_i [ sum_t m_it l_it / max(1, sum_t m_it) ]   (each completion's token mean)
    dapo     sum_it m_it l_it / N                                        (one mean over the step's tokens)
    dr_grpo  sum_it m_it l_it / (B * max_completion_length)              (a constant: no length bias)

A micro-batch adds its share: its sums divided by the step's B or N, so the accumulated gradient is the one of
the whole step in one batch (TRL divides micro-batch means by the accumulation steps, the same value when the
micro-batches hold equally many completions, as they do in both trainers). For ``dapo`` TRL's N is the loss tokens
of the whole generation batch times ``gradient_accumulation_steps / steps_per_generation`` (the trainer passes it as
``num_tokens``), which is the step's own count when a generation batch is one step. The mask m is 0 on the tokens
of a completion left out of the loss (``mask_truncated_completions``).

Metrics (token sums; the trainer divides by N): ``kl``, and the clipped fractions ``clip_ratio/low_mean``
(r < 1 - epsilon where A < 0), ``clip_ratio/high_mean`` (r > 1 + epsilon_high where A > 0) and
``clip_ratio/region_mean`` (either), TRL's names.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import PronghornError
from .grpo_settings import GRPO_LOSS_TYPES

CLIP_METRICS = ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean")


@dataclass
class GRPOLoss:
    """``loss``: this micro-batch's share of the step's loss (backpropagate it). ``sums``: detached token sums
    of the metrics (``kl`` when beta > 0, the clip fractions) and ``tokens``, the micro-batch's N."""

    loss: torch.Tensor
    sums: dict[str, torch.Tensor]


def per_token_loss(logps: torch.Tensor, old_logps: torch.Tensor | None, ref_logps: torch.Tensor | None,
                   advantages: torch.Tensor, beta: float, epsilon: float, epsilon_high: float | None = None,
                   use_bias_correction_kl: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(l [B, T], ratio r [B, T], kl [B, T] or None) from [B, T] log-probs and [B] advantages (formulas above)."""
    high = epsilon if epsilon_high is None else epsilon_high
    old = logps.detach() if old_logps is None else old_logps
    ratio = torch.exp(logps - old)
    adv = advantages.unsqueeze(1)
    loss = -torch.min(ratio * adv, torch.clamp(ratio, 1 - epsilon, 1 + high) * adv)
    kl = None
    if beta != 0.0:
        if ref_logps is None:
            raise PronghornError("beta > 0 needs the reference log-probs (ref_logps)")
        delta = ref_logps - logps
        kl = torch.exp(delta) - delta - 1
        if use_bias_correction_kl:
            kl = kl * ratio
        loss = loss + beta * kl
    return loss, ratio, kl


def grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor | None, ref_logps: torch.Tensor | None,
              advantages: torch.Tensor, mask: torch.Tensor, *, loss_type: str, beta: float, epsilon: float,
              epsilon_high: float | None = None, max_completion_length: int | None = None,
              num_sequences: int | None = None, num_tokens: int | torch.Tensor | None = None,
              use_bias_correction_kl: bool = True) -> GRPOLoss:
    """The loss of [B, T] completion log-probs (``mask`` 1 on completion tokens) as a share of a step of
    ``num_sequences`` completions and ``num_tokens`` completion tokens (default: this batch alone; a count given
    must be > 0)."""
    if loss_type not in GRPO_LOSS_TYPES:
        raise PronghornError(f"loss_type {loss_type!r} is not a GRPO loss; expected one of {', '.join(GRPO_LOSS_TYPES)}")
    mask = mask.to(logps.dtype)
    high = epsilon if epsilon_high is None else epsilon_high
    losses, ratio, kl = per_token_loss(logps, old_logps, ref_logps, advantages, beta, epsilon, high,
                                       use_bias_correction_kl)
    sequences = logps.shape[0] if num_sequences is None else num_sequences
    tokens = mask.sum().clamp(min=1.0) if num_tokens is None else num_tokens  # a given count is used as it is
    masked = losses * mask
    if loss_type == "grpo":
        loss = (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).sum() / sequences
    elif loss_type == "dapo":
        loss = masked.sum() / tokens
    else:
        if max_completion_length is None:
            raise PronghornError("loss_type 'dr_grpo' needs max_completion_length (its constant normaliser)")
        loss = masked.sum() / (sequences * max_completion_length)
    with torch.no_grad():
        adv = advantages.unsqueeze(1)
        low = (ratio < 1 - epsilon) & (adv < 0)
        up = (ratio > 1 + high) & (adv > 0)
        sums = {"tokens": mask.sum()}
        for name, flags in zip(CLIP_METRICS, (low, up, low | up)):
            sums[name] = (flags.to(mask.dtype) * mask).sum()
        if kl is not None:
            sums["kl"] = (kl.detach() * mask).sum()
    return GRPOLoss(loss, sums)
