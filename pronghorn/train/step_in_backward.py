"""The optimizer step fused into the backward pass (``optimizer_in_backward=True``): no full set of gradients.

Full fine-tuning holds a gradient for every weight between the backward pass and the optimizer step: as much
memory as the weights again. Here each parameter has its own optimizer, stepped by a hook that runs as soon as
the parameter's gradient is complete (``register_post_accumulate_grad_hook``); the hook then frees the gradient.
Gradients exist one layer at a time (a tied table's until its last use, the input embedding, is back-propagated).

The result equals the ordinary step exactly (the per-element AdamW math does not depend on grouping) provided
that nothing needs all the gradients at once, so it is refused with

- gradient accumulation (the first micro-batch's gradient would be applied alone), and
- clipping by the global gradient norm (the norm is known only when the last gradient is).

The gradient norm is still measured (summed per parameter in the hooks) and reported. The object stands where
the trainer keeps its optimizer: ``param_groups`` (the learning-rate schedule sets their ``lr``) and ``state``
(one dict the per-parameter optimizers share, so checkpoints save and restore it as usual); ``step`` and
``zero_grad`` do nothing, the hooks having done both.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable

import torch

from ..errors import PronghornError


def check_step_in_backward(gradient_accumulation_steps: int, max_grad_norm: float | None, world_size: int = 1) -> None:
    """Refuse, naming the setting, what the step in the backward cannot do."""
    if gradient_accumulation_steps != 1:
        raise PronghornError(f"optimizer_in_backward applies each gradient as soon as it is computed, so it needs "
                             f"gradient_accumulation_steps=1 (got {gradient_accumulation_steps}); raise batch_size "
                             "instead (CLI: --gradient-accumulation-steps 1 --batch-size N)")
    if max_grad_norm:
        raise PronghornError(f"optimizer_in_backward cannot clip by the global gradient norm (max_grad_norm="
                             f"{max_grad_norm}): the norm is known only after every weight has stepped; set "
                             "max_grad_norm=0 (CLI: --max-grad-norm 0)")
    if world_size != 1:
        raise PronghornError("optimizer_in_backward runs in one process; under torchrun use the ordinary step "
                             "(FSDP shards the gradients instead)")


class StepInBackward:
    """Per-parameter optimizers stepped in the backward pass (module doc). ``build(groups, first_index)``
    makes the optimizer of one parameter: ``groups`` its one-parameter group (the group's settings kept),
    ``first_index`` its index among all the parameters (the stochastic rounding's stream)."""

    def __init__(self, param_groups: list[dict], build: Callable[[list[dict], int], torch.optim.Optimizer]):
        self.state: defaultdict = defaultdict(dict)
        self.param_groups: list[dict] = []
        self._hooks = []
        self._squares: torch.Tensor | None = None
        index = 0
        for group in param_groups:
            for p in group["params"]:
                opt = build([{**group, "params": [p]}], index)
                opt.state = self.state  # one dict for all: what checkpoints save and restore
                self.param_groups.extend(opt.param_groups)
                self._hooks.append(p.register_post_accumulate_grad_hook(self._stepper(opt)))
                index += 1

    def _stepper(self, opt: torch.optim.Optimizer):
        def step(p: torch.Tensor) -> None:
            square = torch.linalg.vector_norm(p.grad, dtype=torch.float32).square()
            self._squares = square if self._squares is None else self._squares + square
            opt.step()
            p.grad = None
        return step

    def grad_norm(self) -> float:
        """The norm of all gradients of the last backward pass (as clip_grad_norm_ reports it); resets the sum."""
        squares, self._squares = self._squares, None
        return 0.0 if squares is None else float(squares.sqrt())

    def step(self, closure=None) -> None:
        """Nothing left to do: every parameter stepped in the backward pass."""

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Nothing to clear: the hooks freed every gradient."""

    def remove(self) -> None:
        """Detach the hooks (the parameters' backward no longer steps them)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
