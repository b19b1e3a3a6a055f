"""What GRPO adds to the settings: its loss aggregations, reward scalings, and the per-method defaults of the
settings GRPO shares with preference training (TRL's names: ``beta``, ``loss_type``).

TRL's defaults differ per trainer: ``DPOConfig`` / ``KTOConfig`` / ``ORPOConfig`` have ``beta=0.1`` and DPO
``loss_type="sigmoid"``; ``GRPOConfig`` has ``beta=0.0`` (no reference model, no reference forward) and
``loss_type="dapo"``. :class:`~pronghorn.train.config.TrainConfig` leaves both ``None`` until it knows the method.
"""

from __future__ import annotations

from ..errors import PronghornError, spell
from .preference_losses import DPO_LOSS_TYPES

GRPO_LOSS_TYPES = ("dapo", "grpo", "dr_grpo")
SCALE_REWARDS = ("group", "batch", "none")


def method_defaults(method: str) -> dict:
    """``beta`` and ``loss_type`` as TRL's config for ``method`` sets them."""
    return {"beta": 0.0, "loss_type": "dapo"} if method == "grpo" else {"beta": 0.1, "loss_type": "sigmoid"}


def resolve_method_defaults(cfg) -> None:
    """Fill ``beta`` / ``loss_type`` from the method when unset and refuse a value that belongs to another method (naming the setting and its flag)."""
    grpo = cfg.method == "grpo"
    for name, value in method_defaults(cfg.method).items():
        if getattr(cfg, name) is None:
            setattr(cfg, name, value)
    if not grpo and cfg.method != "sft" and not cfg.beta > 0:
        raise PronghornError(f"{spell('beta')} must be > 0 for method {cfg.method!r}, got {cfg.beta!r}")
    allowed = GRPO_LOSS_TYPES if grpo else DPO_LOSS_TYPES
    if cfg.method in ("grpo", "dpo") and cfg.loss_type not in allowed:
        raise PronghornError(f"{spell('loss_type')} must be one of {', '.join(allowed)} for method {cfg.method!r}, "
                             f"got {cfg.loss_type!r}")


def scale_rewards_mode(value: str | bool) -> str:
    """TRL's spellings: True is "group", False is "none" (also "true" / "false" from a command line)."""
    if isinstance(value, str) and value.lower() in ("true", "false"):
        value = value.lower() == "true"
    if isinstance(value, bool):
        return "group" if value else "none"
    if value not in SCALE_REWARDS:
        raise PronghornError(f"scale_rewards must be one of {', '.join(SCALE_REWARDS)} (or true / false), got {value!r}")
    return value
