"""Gather an FSDP2-sharded model into full CPU tensors on rank 0, so the ordinary export code runs unchanged.

:func:`gathered` is a collective (every rank calls it): each sharded parameter is all-gathered in turn
(``DTensor.full_tensor``: one full tensor at a time on the device, then copied to the host on rank 0 only), so
the GPU never holds more than one extra full tensor. Inside the ``with`` block rank 0's model holds full CPU
copies of every parameter and buffer (tied parameters stay tied), and ``save_pretrained_merged``,
``save_adapter`` or ``state_dict()`` see an ordinary unsharded model; afterwards the shards are put back.
Other ranks get ``None``. An unsharded model is yielded as it is.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn


def _is_sharded(t: torch.Tensor) -> bool:
    return hasattr(t, "full_tensor")  # a DTensor (FSDP2 shard)


def is_sharded_model(model: nn.Module) -> bool:
    return any(_is_sharded(p) for p in model.parameters())


@contextlib.contextmanager
def gathered(model: nn.Module) -> Iterator[nn.Module | None]:
    if not is_sharded_model(model):
        yield model
        return
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():  # every shard registered (no layer left unsharded after a forward)
        if isinstance(m, FSDPModule):
            m.reshard()
    main = dist.get_rank() == 0
    full: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        for _, p in model.named_parameters():  # the same order on every rank: the collectives line up
            if _is_sharded(p):
                t = p.full_tensor()
                if main:
                    full[id(p)] = nn.Parameter(t.cpu(), requires_grad=p.requires_grad)
                del t
    if not main:
        yield None
        return
    saved: list[tuple[dict, str, torch.Tensor]] = []
    try:
        for module in model.modules():
            for store in (module._parameters, module._buffers):
                for name, t in list(store.items()):
                    if t is None:
                        continue
                    saved.append((store, name, t))
                    if id(t) in full:
                        store[name] = full[id(t)]
                    elif isinstance(t, nn.Parameter):
                        full[id(t)] = nn.Parameter(t.detach().cpu(), requires_grad=t.requires_grad)
                        store[name] = full[id(t)]
                    else:
                        store[name] = t.cpu()
        yield model
    finally:
        for store, name, t in reversed(saved):
            store[name] = t


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state as full CPU tensors on rank 0 (empty elsewhere); a collective when sharded."""
    with gathered(model) as m:
        return {} if m is None else {k: v.detach().cpu() for k, v in m.state_dict().items()}
