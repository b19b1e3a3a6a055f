"""Checkpoints of full fine-tuning, written by every rank in parallel (torch.distributed.checkpoint, DCP).

Full fine-tuning trains the base weights, which FSDP2 shards over the ranks: each rank writes its own shards
of the trained parameters and of their optimizer moments, and no rank ever holds the whole model. The
layout of ``checkpoint-N/``::

    sharded/shard-0000{r}-model-00001-of-00001.safetensors   rank r's pieces; each file's safetensors header
                                                             records the pieces' offsets in the full tensors
    rng_state.safetensors, trainer_state.json               written by rank 0 (as in adapter checkpoints)

Tensor names are the parameter names, and ``<name>::<slot>`` for the optimizer state (``exp_avg``, ...), as
in ``optimizer.safetensors`` of adapter checkpoints. DCP's Hugging Face storage (safetensors + JSON headers)
is used instead of its default format, whose ``.metadata`` file is a pickle: loading unpickles nothing.
DCP reshards on load, so a run resumes on any number of ranks (or in one process).

Atomic: every rank writes into ``.checkpoint-N.tmp`` (rank 0 empties it first); after a barrier rank 0 adds the
RNG state and ``trainer_state.json`` and renames the directory to ``checkpoint-N`` (the trainer state is what
makes a directory a complete checkpoint for :func:`list_checkpoints`). A run that dies while saving leaves
only the hidden temporary directory, which the next save of that step replaces. The output directory must be
one file system that every rank sees (one machine, or a shared file system for several).
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ..errors import CheckpointError
from .checkpoint import STATE, load_rng_state, save_rng_state

SHARDED = "sharded"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def is_sharded_checkpoint(path: Path) -> bool:
    return (Path(path) / SHARDED).is_dir()


def save_sharded_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> Path:
    """Every rank calls this (a collective); see the module doc for the layout."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / SHARDED).mkdir(parents=True)
    _barrier()
    params = _trainable(model)
    names = {id(p): n for n, p in params.items()}
    tensors = {n: p.detach() for n, p in params.items()}  # FSDP: DTensors, each rank writes its pieces
    seen: set[int] = set()
    for group in optimizer.param_groups:
        for p in group["params"]:
            for slot, value in optimizer.state.get(p, {}).items():
                value = torch.as_tensor(value).detach()
                if not hasattr(value, "full_tensor") and value.numel():
                    if value.data_ptr() in seen:  # shared by several weights (bitsandbytes' quantization maps):
                        value = value.clone()  # safetensors stores each name's own copy
                    seen.add(value.data_ptr())
                tensors[f"{names[id(p)]}::{slot}"] = value
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # one process: intended
        dcp.save(tensors, storage_writer=HuggingFaceStorageWriter(str(tmp / SHARDED), save_distributed=True),
                 no_dist=not dist.is_initialized())
    _barrier()
    if _rank() == 0:
        save_rng_state(tmp)
        (tmp / STATE).write_text(json.dumps(state, indent=2) + "\n")
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    _barrier()  # no rank goes on (and e.g. prunes or resumes) before the checkpoint exists
    return path


def load_sharded_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Restore the trained parameters (each rank its own shards), the optimizer moments and rank 0's RNG
    state from ``path``; return the saved trainer state. Every rank calls this."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    path = Path(path)
    for name in (STATE, "rng_state.safetensors", SHARDED):
        if not (path / name).exists():
            raise CheckpointError(f"{path / name}: missing; {path} is not a complete pronghorn sharded checkpoint")
    reader = HuggingFaceStorageReader(str(path / SHARDED))
    stored = reader.read_metadata().state_dict_metadata
    params = _trainable(model)
    missing = sorted(set(params) - set(stored))
    if missing:
        raise CheckpointError(f"{path / SHARDED}: no tensor for {missing[:4]}; the checkpoint is of another model "
                              "or of a LoRA run")
    fused = {id(p): bool(g.get("fused") or g.get("capturable")) for g in optimizer.param_groups for p in g["params"]}
    targets: dict[str, torch.Tensor] = {}
    for key, meta in stored.items():
        name, _, slot = key.partition("::")
        if name not in params:
            raise CheckpointError(f"{path / SHARDED}: tensor {key} belongs to no trainable parameter of this model")
        p = params[name]
        if tuple(meta.size) != tuple(p.shape) and slot == "":
            raise CheckpointError(f"{path / SHARDED}: {name} has shape {tuple(meta.size)}, the model's is "
                                  f"{tuple(p.shape)}")
        if slot == "":
            targets[key] = p.detach()  # loaded in place into this rank's shard
        elif tuple(meta.size) == tuple(p.shape):
            targets[key] = torch.zeros_like(p.detach(), dtype=meta.properties.dtype)
        elif len(meta.size):  # state of another shape (bitsandbytes' quantization map, block scales)
            targets[key] = torch.zeros(meta.size, dtype=meta.properties.dtype, device=p.device)
        else:  # a scalar such as the step count: the same on every rank
            targets[key] = torch.zeros(meta.size, dtype=meta.properties.dtype)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # one process: intended
        dcp.load(targets, storage_reader=reader, no_dist=not dist.is_initialized())
    optimizer.state.clear()
    for key, value in targets.items():
        name, _, slot = key.partition("::")
        if slot:
            p = params[name]
            if value.dim() == 0 and fused.get(id(p)):
                value = value.to(p.device)
            optimizer.state[p][slot] = value
    load_rng_state(path)
    return json.loads((path / STATE).read_text())
