"""The adapters' matmul operands (``A`` and ``s * B`` in the compute dtype), made once in a recomputed layer's
forward and taken again by its replays.

Before its matmuls every fast LoRA op casts its adapter matrices to the compute dtype and scales ``B``: two or
three small kernels per projection, a stacked ``A`` for the q/k/v op. A layer replayed for its backward
(models/recompute.py) would launch them all again, twice for the attention block of a split replay, for the
same values: a small model at a GPU is bound by such launches (docs/benchmarks.md, session 9 profile). Inside
``operands_kept(store)`` the ops look their operands up in ``store`` (a plain dict) before making them; a
replayed layer opens its store in its forward and again in its backward, then drops it; so does a tiled MLP
(models/tiled_mlp.py), whose backward replays it chunk by chunk. Between the two the store holds the layer's
operands: the adapter's size in the compute dtype (counted by the memory plan).

This is a cache, not a switch of numerics: an entry is taken only for the same adapter tensors at the same
versions (an in-place change of an adapter makes new operands), so the values are what a fresh cast gives, bit
for bit. Outside a store (kept layers, inference) every call makes its operands.

A model in training keeps one store for all its layers across steps (kernels/step_operands.StepOperands,
opened by ``DecoderModel.forward``): its operands are made once and written again in place, with for-each
kernels, after the adapters change; replayed layers and tiled MLPs then take that store (``open_store``).

The decoder's runner (infer/static_decode.py) keeps a :class:`GraphOperands` store instead: its CUDA graph reads
the operands' memory, so an entry stays the same tensors and is made again *in place* (the step store's for-each
remake), once per ``renew()`` (each generate call's prefill), whatever the versions say (an 8-bit optimizer writes
the adapters without bumping them). A decode step then launches no cast or scale per projection: a step of a
16-layer model with seven adapted projections each ran about 20 such kernels a layer.
"""

from __future__ import annotations

import contextlib
import contextvars

import torch

from .step_operands import GraphOperands, StepOperands

_STORE: contextvars.ContextVar[dict | None] = contextvars.ContextVar("pronghorn_adapter_operands", default=None)


@contextlib.contextmanager
def operands_kept(store: dict):
    """Inside the block the LoRA ops take their operands from ``store`` and put the ones they make there. (A
    context variable: the autograd engine runs a CUDA backward in its own thread, and the store is opened there.)"""
    token = _STORE.set(store)
    try:
        yield store
    finally:
        _STORE.reset(token)


def open_store() -> dict:
    """The store in use now (a tiled MLP inside a replayed layer shares the layer's), else a new one."""
    store = _STORE.get()
    return {} if store is None else store


def scaled_b(lora_B: torch.Tensor, scaling: float, adt: torch.dtype) -> torch.Tensor:
    """``s * B`` in the adapter's compute dtype: with it ``x A^T (sB)^T`` is the delta and ``dY (sB)`` the rank-r
    factor of both ``dA`` and the adapter's share of ``dX``."""
    b = lora_B.to(adt)
    return b * scaling if scaling != 1.0 else b


def adapter_operands(lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, adt: torch.dtype):
    """``(A, s * B)`` in ``adt`` for one projection."""
    return _kept(("one", scaling, adt), (lora_A, lora_B), lambda: (lora_A.to(adt), scaled_b(lora_B, scaling, adt)),
                 lambda v: [(v[0], lora_A, 1.0), (v[1], lora_B, scaling)])


def stacked_operands(projs, adt: torch.dtype):
    """``(A stacked over projs, [s_i * B_i])`` in ``adt`` for projections sharing one input (``LoRAProjection``s):
    ``x A^T`` of all of them is then one matmul."""
    def make():
        a = (torch.cat([p.lora_A for p in projs]) if len(projs) > 1 else projs[0].lora_A).to(adt)  # cast once
        return a, [scaled_b(p.lora_B, p.scaling, adt) for p in projs]

    def parts(value):  # each A is a block of rows of the stack
        a, bss = value
        starts = [0]
        for p in projs:
            starts.append(starts[-1] + p.lora_A.shape[0])
        return [*((a[s:e], p.lora_A, 1.0) for s, e, p in zip(starts, starts[1:], projs)),
                *((bs, p.lora_B, p.scaling) for bs, p in zip(bss, projs))]

    sources = tuple(t for p in projs for t in (p.lora_A, p.lora_B))
    return _kept(("stacked", tuple(p.scaling for p in projs), adt), sources, make, parts)


def _kept(kind: tuple, sources: tuple, make, parts):
    store = _STORE.get()
    if isinstance(store, GraphOperands) or (isinstance(store, StepOperands) and not torch.is_inference_mode_enabled()):
        return store.take((kind, *map(id, sources)), sources, make, parts)
    if store is None or torch.is_inference_mode_enabled():
        return make()
    key = (kind, *map(id, sources))
    versions = tuple(t._version for t in sources)
    entry = store.get(key)
    if entry is not None and entry[1] == versions and all(a is b for a, b in zip(entry[0], sources)):
        return entry[2]
    value = make()
    store[key] = (sources, versions, value)
    return value
