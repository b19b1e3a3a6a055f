"""The reference model of preference training as a view: the policy with its LoRA switched off, no weight copy.

TRL's ``DPOTrainer`` / ``KTOTrainer`` (1.x) find the reference like this: a ``peft.PeftModel`` policy uses
itself with ``disable_adapter()`` (an ``isinstance`` check, which a pronghorn model cannot pass without being a
PEFT model); ``precompute_ref_log_probs=True`` scores the dataset once with the policy before the first step
(exact while the LoRA is fresh, B = 0); otherwise, with ``ref_model=None``, TRL loads a second full model from
``config._name_or_path``. The third is the copy we avoid: pass ``ref_model=model.as_reference()`` instead.

:class:`ReferenceView` is an ``nn.Module`` that owns nothing: the policy is held outside the module tree, so
``parameters()`` is empty (no second set of weights, no parameter counted twice, ``.to()`` / ``.eval()`` /
dropout changes by the trainer on the view leave the policy alone). Every call runs the policy with adapters
disabled under ``no_grad``: ``forward`` (what a trainer calls) and ``base_model`` (the backbone TRL's fused LM
head calls before applying ``get_output_embeddings().weight``). ``state_dict`` is the policy's, so TRL's
precompute cache key (a hash of the reference's state) tells different models apart.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .errors import PronghornError


class _AdaptersOff:
    """Calls ``fn`` with the policy's adapters switched off and gradients off."""

    def __init__(self, policy: nn.Module, fn):
        self._policy, self._fn = policy, fn

    def __call__(self, *args, **kwargs):
        with torch.no_grad(), self._policy.disable_adapter():
            return self._fn(*args, **kwargs)


class ReferenceView(nn.Module):
    """``policy`` with its adapters disabled; shares (does not copy or register) the policy's weights."""

    def __init__(self, policy: nn.Module):
        if getattr(policy, "lora_config", None) is None or not hasattr(policy, "disable_adapter"):
            raise PronghornError("a reference view needs a model with LoRA attached (its base model is the "
                                 "reference); for full fine-tuning pass a separate ref_model")
        super().__init__()
        self.__dict__["policy"] = policy  # not a submodule: the view owns no parameters

    # --- what a trainer reads of a transformers model ---
    @property
    def config(self):
        return self.policy.config

    @property
    def generation_config(self):
        return self.policy.generation_config

    @property
    def device(self) -> torch.device:
        return self.policy.device

    @property
    def dtype(self) -> torch.dtype:
        return self.policy.dtype

    @property
    def name_or_path(self):
        return getattr(self.policy, "name_or_path", None)

    @property
    def base_model(self) -> _AdaptersOff:
        return _AdaptersOff(self.policy, self.policy.base_model)

    def get_input_embeddings(self) -> nn.Module:
        return self.policy.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.policy.get_output_embeddings()

    def forward(self, *args, **kwargs) -> Any:
        return _AdaptersOff(self.policy, self.policy)(*args, **kwargs)

    def state_dict(self, *args, **kwargs):
        return self.policy.state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"adapters disabled: {type(self.policy).__name__}"
