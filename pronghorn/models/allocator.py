"""PyTorch's CUDA caching allocator under a memory budget.

A budget (``max_memory``, or ``torch.cuda.set_per_process_memory_fraction``) caps the memory the allocator
*reserves*, while the memory plan counts what tensors *allocate*. With the allocator's default fixed-size
segments the two drift apart: freed blocks of one size cannot serve a request of another, so a step whose
tensors fit can still run out of memory. On an H200, Llama-3.1-8B QLoRA on 1 x 8192 tokens under a 16 GiB cap
stopped with 12.45 GiB allocated and 2.93 GiB reserved but unused when it asked for a 1 GiB logits chunk (and
FSDP2 under a 14 GiB cap, session 5, at 12.1 GiB allocated). Expandable segments map memory into one growing
range instead, so freed memory serves any later size; Unsloth turns them on for every process.

pronghorn turns them on the first time a step is planned under such a cap, unless the process's allocator
settings (``PYTORCH_CUDA_ALLOC_CONF`` / ``PYTORCH_ALLOC_CONF``) already say either way. Segments reserved
before that stay as they are; later ones (activations, the loss's chunks) expand.
"""

from __future__ import annotations

import os
import weakref

import torch

_ENV = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")
_state = {"done": False}
_graphs: weakref.WeakSet = weakref.WeakSet()  # captured CUDA graphs alive in this process (note_graph)


def user_allocator_choice() -> str | None:
    """The allocator setting the user made about expandable segments (``"expandable_segments:True"`` and the
    like, from the environment), or None when they made none."""
    for name in _ENV:
        for item in os.environ.get(name, "").split(","):
            key = item.split(":", 1)[0].strip()
            if key in ("expandable_segments", "backend"):  # cudaMallocAsync has no segments to expand
                return f"{name}={os.environ[name]}"
    return None


def apply_setting(setting: str) -> None:
    """Change the process's allocator settings (``"key:value"``, the syntax of PYTORCH_ALLOC_CONF). torch 2.11
    deprecates ``torch.cuda.memory._set_allocator_settings`` (a FutureWarning) for the accelerator-wide call;
    the older releases we support have only the former."""
    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None)
    if setter is None:
        setter = torch.cuda.memory._set_allocator_settings
    setter(setting)


def expand_segments_under_budget(device: torch.device, budget_source: str) -> bool:
    """Turn on expandable segments for this process when ``budget_source`` is a cap set by the user (max_memory
    or the process's memory fraction) on a CUDA device and the user chose nothing about them; once per process.
    Returns whether this call turned them on."""
    if device.type != "cuda" or _state["done"] or not budget_source.startswith(("max_memory", "set_per_process")):
        return False
    _state["done"] = True
    if user_allocator_choice() is not None:
        return False
    try:
        apply_setting("expandable_segments:True")
    except (AttributeError, RuntimeError) as e:  # an allocator without the setting: the headroom must do
        print(f"pronghorn: could not turn on the CUDA allocator's expandable segments ({e}); a capped step may "
              "run out of memory to fragmentation: set PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True", flush=True)
        return False
    print(f"pronghorn: CUDA allocator: expandable segments on under the memory budget ({budget_source}), so "
          "freed memory serves any later size; set PYTORCH_CUDA_ALLOC_CONF=expandable_segments:False to keep "
          "fixed segments", flush=True)
    return True


def note_graph(graph) -> None:
    """Record a captured CUDA graph: it bakes in the cuBLAS workspace of its capture stream, so the workspaces
    may not be freed while it lives (:func:`release_workspaces`)."""
    _graphs.add(graph)


def workspaces_baked() -> bool:
    """Whether a captured CUDA graph that may use a cuBLAS workspace is alive (noted by :func:`note_graph`)."""
    return len(_graphs) > 0


def release_workspaces() -> bool:
    """Free the cuBLAS workspaces torch keeps per (handle, stream), those of streams gone included: they count
    as allocated memory (32 MiB each on Hopper) and are made again, lazily, on a live stream's next matmul.
    Nothing is freed while a captured graph lives (a freed workspace could be handed to a tensor the graph's
    matmuls would then overwrite): pronghorn's own graphs are noted (:func:`note_graph`); a graph a user captures
    around our matmuls is not known here (torch.compile's graph trees clear workspaces around their captures, so
    theirs hold none). Returns whether they were freed."""
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear is None or not torch.cuda.is_available() or workspaces_baked():
        return False
    clear()
    return True
