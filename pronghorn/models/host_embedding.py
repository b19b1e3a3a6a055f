"""The input embedding table, optionally kept in pinned host memory (``offload_embedding=True``).

An untied, frozen embedding table is the largest tensor a LoRA/QLoRA step never updates and barely reads: one
row per token. Llama-3.1-8B's is 1.0 GB of bf16 (128,256 x 4,096), more than a seventh of a QLoRA step's GPU
memory. :func:`offload_embedding` moves it to pinned host memory; :class:`Embedding` then gathers the rows of
device token ids straight from host memory: the table is exposed to CUDA kernels as a device tensor that
aliases the pinned pages (unified addressing), so the lookup is one ordinary embedding kernel that reads
``tokens x hidden`` values over PCIe, with no host synchronization (CUDA graphs can capture it). Where that
view cannot be made, the ids are copied to the host, gathered there and the rows copied back (exact, one sync).

A tied table is also the output head's weight. It stays on the device unless asked (``tied=True``,
``offload_embedding="tied"``): then the training losses stream it from the host one vocabulary slice at a time
(``kernels.streamed_logprobs``: the table crosses PCIe once per loss, overlapped with the head's matmuls), and
logits for generation use a transient device copy of the table (slow per token; for training-memory runs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import PronghornError


class Embedding(nn.Embedding):
    """``nn.Embedding`` whose table may live on the host while the ids and the rest of the model are on a GPU."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if weight.device == ids.device or ids.device.type != "cuda":
            return super().forward(ids)
        if weight.requires_grad and torch.is_grad_enabled():
            raise PronghornError("the input embedding is offloaded to the host and cannot be trained there; "
                                 "load without offload_embedding to train it")
        view = _device_view(self, ids.device)
        if view is not None:
            return F.embedding(ids, view, self.padding_idx)
        rows = F.embedding(ids.cpu(), weight, self.padding_idx)
        return rows.pin_memory().to(ids.device, non_blocking=True)


def _device_view(module: Embedding, device: torch.device) -> torch.Tensor | None:
    """The pinned host table as a CUDA tensor aliasing the same memory, cached on the module; None when the
    table is not pinned or the driver refuses the view."""
    weight = module.weight
    key = (weight.data_ptr(), device)
    cached = module.__dict__.get("_host_view")
    if cached is not None and cached[0] == key:
        return cached[1]
    view = None
    if weight.is_pinned() and weight.is_contiguous():
        try:
            view = _alias_on_device(weight.detach(), device)
        except (RuntimeError, TypeError, ValueError):
            view = None
    module.__dict__["_host_view"] = (key, view)
    return view


class _CudaArray:
    """``__cuda_array_interface__`` for pinned host memory, whose address is valid on the device under unified
    addressing; keeps the host tensor alive as long as the view."""

    _TYPES = {2: "<i2", 4: "<f4", 8: "<f8"}

    def __init__(self, host: torch.Tensor):
        self.host = host
        self.__cuda_array_interface__ = {"shape": tuple(host.shape), "typestr": self._TYPES[host.element_size()],
                                         "data": (host.data_ptr(), False), "version": 3, "strides": None}


def _alias_on_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CUDA tensor over ``host``'s pinned memory (bf16/fp16 pass as int16: the interface has no bfloat16)."""
    raw = host.view(torch.int16) if host.element_size() == 2 else host.view(
        torch.float32 if host.element_size() == 4 else torch.float64)
    with torch.cuda.device(device):
        view = torch.as_tensor(_CudaArray(raw), device=device)
    return view.view(host.dtype)


def offload_embedding(model, tied: bool = False) -> bool:
    """Move a causal LM's input embedding table (``model.get_input_embeddings()``) to pinned host memory, frozen.

    Returns False, with a printed note, where it stays: a table tied to the output head unless ``tied`` (the
    head then streams it, see the module docstring), or a model not on a GPU (the host is where it already is)."""
    module = model.get_input_embeddings()
    weight = module.weight
    if not isinstance(module, Embedding):
        raise PronghornError(f"offload_embedding needs pronghorn's Embedding, got {type(module).__name__}")
    if weight.device.type != "cuda":
        return False
    head = model.get_output_embeddings()
    is_tied = head is not None and head.weight is weight
    if is_tied and not tied:
        print("pronghorn: offload_embedding: the embedding is tied to the output head, which needs it on the "
              "GPU: kept there (offload_embedding='tied' streams the head from the host instead)", flush=True)
        return False
    host = torch.empty(weight.shape, dtype=weight.dtype, pin_memory=True)
    host.copy_(weight.detach())
    module.weight = nn.Parameter(host, requires_grad=False)
    if is_tied:
        head.weight = module.weight
    module.__dict__.pop("_host_view", None)
    del weight
    torch.cuda.empty_cache()
    return True
