"""What GRPO adds to the settings: its loss aggregations, reward scalings, the generation batch's size, and the
per-method defaults of the settings GRPO shares with preference training (TRL's names: ``beta``, ``loss_type``).

TRL's defaults differ per trainer: ``DPOConfig`` / ``KTOConfig`` / ``ORPOConfig`` have ``beta=0.1`` and DPO
``loss_type="sigmoid"``; ``GRPOConfig`` has ``beta=0.0`` (no reference model, no reference forward) and
``loss_type="dapo"``. :class:`~pronghorn.train.config.TrainConfig` leaves both ``None`` until it knows the method.
"""

from __future__ import annotations

from ..errors import PronghornError, spell
from .distributed import env_from_os
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


def generation_shape(cfg, world_size: int = 1) -> tuple[int, int]:
    """(steps_per_generation, generation_batch_size) as TRL's ``GRPOConfig`` resolves them: the generation batch is
    global, ``batch_size * world_size * steps_per_generation`` completions (each rank generates its share). Neither
    set: ``steps_per_generation = gradient_accumulation_steps``; one set: the other from it; both: refused. A
    generation batch must hold whole groups (a multiple of ``num_generations``)."""
    spg, size, bs = cfg.steps_per_generation, cfg.generation_batch_size, cfg.batch_size
    if spg is not None and size is not None:
        raise PronghornError(f"give {spell('steps_per_generation')} or {spell('generation_batch_size')}, not both")
    ranks = f" x {world_size} ranks" if world_size > 1 else ""
    if size is not None:
        if size % (bs * world_size):
            raise PronghornError(f"{spell('generation_batch_size')} = {size} is not a multiple of batch_size {bs}"
                                 f"{ranks} (a generation batch is split into micro-batches of batch_size completions"
                                 f"{' on each rank' if ranks else ''})")
        spg = size // (bs * world_size)
    spg = cfg.gradient_accumulation_steps if spg is None else spg
    size = bs * world_size * spg
    if size % cfg.num_generations:
        source = ("generation_batch_size" if cfg.generation_batch_size is not None else
                  f"batch_size {bs}{ranks} x steps_per_generation {spg}" if cfg.steps_per_generation is not None else
                  f"batch_size {bs}{ranks} x gradient_accumulation_steps {spg}, steps_per_generation's default")
        raise PronghornError(f"GRPO's generation batch of {size} completions ({source}) is not a multiple of "
                             f"num_generations={cfg.num_generations}")
    return spg, size


def check_generation_batch(cfg) -> None:
    """:func:`generation_shape`'s errors when the config is built (GRPO only; the launcher's world size)."""
    if cfg.method == "grpo":
        generation_shape(cfg, env_from_os().world_size)
