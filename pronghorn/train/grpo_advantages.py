"""Rewards to group-relative advantages (TRL 1.16's ``sum_then_normalize``, its default).

Completions come in groups of G (``num_generations``) consecutive rows, one group per prompt. With the
rewards ``R[n, f]`` of reward function f (NaN where it returned None) and weights ``w_f``::

    reward_n    = sum_f w_f R[n, f]  over the functions that scored n   (NaN when none did)
    mean_n      = mean of reward over n's group (NaN ignored)
    std_n       = sample std (n - 1) of reward over n's group ("group"), over the whole batch ("batch"),
                  NaN ignored
    advantage_n = (reward_n - mean_n) / (std_n + 1e-4)   ("group", "batch")
                = reward_n - mean_n                      ("none")

and an unscorable completion (no function scored it) gets advantage 0.
"""

from __future__ import annotations

import torch

from ..errors import PronghornError
from .grpo_settings import SCALE_REWARDS

STD_EPS = 1e-4


def nan_std(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sample standard deviation (Bessel-corrected) over ``dim`` (None: all), NaN entries ignored."""
    dims = tuple(range(x.dim())) if dim is None else dim
    mean = torch.nanmean(x, dim=dims, keepdim=True)
    count = (~torch.isnan(x)).sum(dim=dims)
    return (torch.nanmean((x - mean) ** 2, dim=dims) * count / (count - 1)).sqrt()


def combine_rewards(rewards_per_func: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """[N] weighted sums of the [N, F] rewards, NaN entries left out; NaN where every function gave None."""
    combined = (rewards_per_func * weights.to(rewards_per_func).unsqueeze(0)).nansum(dim=1)
    return combined.masked_fill(torch.isnan(rewards_per_func).all(dim=1), float("nan"))


def group_advantages(rewards: torch.Tensor, num_generations: int, scale_rewards: str = "group"
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages [N], the std each was scaled by [N]) of [N] rewards in consecutive groups of
    ``num_generations`` (formulas above)."""
    if scale_rewards not in SCALE_REWARDS:
        raise PronghornError(f"scale_rewards must be one of {', '.join(SCALE_REWARDS)}, got {scale_rewards!r}")
    if rewards.numel() % num_generations:
        raise PronghornError(f"{rewards.numel()} rewards do not split into groups of num_generations={num_generations}")
    groups = rewards.view(-1, num_generations)
    mean = torch.nanmean(groups, dim=1).repeat_interleave(num_generations)
    if scale_rewards == "batch":
        std = nan_std(rewards).expand_as(rewards)
    else:
        std = nan_std(groups, dim=1).repeat_interleave(num_generations)
    advantages = rewards - mean
    if scale_rewards != "none":
        advantages = advantages / (std + STD_EPS)
    return torch.nan_to_num(advantages, nan=0.0), std
