"""Loss scaling for fp16 training in the native trainers (a GPU without bf16: T4, V100).

Under fp16 autocast the backward's activation gradients are fp16: the small ones underflow to zero before they
reach the fp32 adapters. As HF Trainer does with ``fp16=True`` (torch's ``GradScaler``), the loss is multiplied
by a power of two before its backward, the gradients divided by it before clipping (exact: powers of two), and a
step whose gradients overflowed is skipped and the scale halved. The scale goes into each training checkpoint,
so a resumed run scales as the uninterrupted one would. bf16 and fp32 steps are untouched (no scaler).
"""

from __future__ import annotations

import torch

from ..errors import PronghornError


def loss_scaler(device: torch.device, autocast_dtype: torch.dtype | None, in_backward: bool = False, params=()):
    """A ``torch.amp.GradScaler`` for fp16 autocast, else None. fp16 weights trained themselves (full fine-tuning
    of a fp16 model) get none: their fp16 gradients cannot be unscaled in place, as HF Trainer refuses them too."""
    if autocast_dtype != torch.float16:
        return None
    if any(p.dtype == torch.float16 for p in params):
        print("pronghorn: float16 weights train without loss scaling (small gradients may underflow); load the model "
              "in float32 (dtype) to train it under fp16 autocast with loss scaling", flush=True)
        return None
    if in_backward:
        raise PronghornError("optimizer_in_backward cannot train in float16: each weight steps before the loss "
                             "scaler knows whether a gradient overflowed; turn it off or load the model in bfloat16 "
                             "or float32 (dtype)")
    return torch.amp.GradScaler(device.type)


def backward(scaler, loss: torch.Tensor) -> None:
    (loss if scaler is None else scaler.scale(loss)).backward()


def clip_and_step(scaler, optimizer, params, max_grad_norm: float | None) -> float:
    """Unscale, clip to ``max_grad_norm`` (None or 0: no clipping) and step; returns the gradient norm before
    clipping (inf or nan on an overflowed fp16 step, which is skipped)."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm or float("inf"))
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)
        scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return float(norm)


def scaler_state(scaler) -> dict:
    """What a checkpoint's state JSON records of it ({} without one)."""
    if scaler is None:
        return {}
    state = scaler.state_dict()
    return {"loss_scale": {k: (float(v) if isinstance(v, float) else int(v)) for k, v in state.items()}}


def load_scaler_state(scaler, state: dict) -> None:
    if scaler is not None and state.get("loss_scale"):
        scaler.load_state_dict(dict(state["loss_scale"]))
