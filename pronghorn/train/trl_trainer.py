"""``embedding_learning_rate`` under TRL's SFTTrainer: :class:`PronghornTrainer` and
:class:`PronghornTrainingArguments` (what Unsloth's ``UnslothTrainer`` / ``UnslothTrainingArguments`` are to its
users: continued pretraining with ``embed_tokens`` / ``lm_head`` in ``target_modules``, trained at a smaller rate).

The optimizer is the one TRL / HF build from ``args.optim`` (weight decay split, 8-bit or fused AdamW, ...); only
the tables trained fully beside the adapters move into param groups of their own at ``embedding_learning_rate``.
The scheduler HF builds afterwards scales every group by the same factor, so the two rates keep their ratio.
Needs ``trl`` (imported when this module is).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import trl

from ..errors import PronghornError
from ..models.lora import trained_modules


def split_embedding_groups(optimizer: torch.optim.Optimizer, model: torch.nn.Module, embedding_lr: float) -> int:
    """Move the fully trained ``embed_tokens`` / ``lm_head`` weights of ``model`` out of ``optimizer``'s groups
    into copies of those groups at ``embedding_lr`` (before any step: no state to move). Returns how many
    tensors moved; 0 means none trains, which with an explicit rate is an error."""
    tables = {id(p) for _, p in trained_modules(model)}
    moved, new_groups = 0, []
    for group in optimizer.param_groups:
        mine = [p for p in group["params"] if id(p) in tables]
        if mine:
            group["params"] = [p for p in group["params"] if id(p) not in tables]
            new_groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": mine,
                               "lr": embedding_lr})
            moved += len(mine)
    for group in new_groups:
        optimizer.add_param_group(group)
    if not moved:
        raise PronghornError("embedding_learning_rate is set but embed_tokens / lm_head do not train; add them to "
                             "get_peft_model(target_modules=[..., 'embed_tokens', 'lm_head'])")
    return moved


@dataclass
class PronghornTrainingArguments(trl.SFTConfig):
    """``trl.SFTConfig`` plus ``embedding_learning_rate`` (Unsloth's name)."""

    embedding_learning_rate: float | None = field(default=None, metadata={
        "help": "peak learning rate of embed_tokens / lm_head when they train fully (None: learning_rate)"})


class PronghornTrainer(trl.SFTTrainer):
    """``trl.SFTTrainer`` that honours ``args.embedding_learning_rate`` (see the module docstring)."""

    def create_optimizer(self, model=None):
        fresh = self.optimizer is None
        optimizer = super().create_optimizer(model)
        lr = getattr(self.args, "embedding_learning_rate", None)
        if fresh and lr is not None:
            split_embedding_groups(optimizer, self.model if model is None else model, lr)
        return optimizer
