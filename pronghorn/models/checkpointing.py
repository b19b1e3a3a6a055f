"""Gradient checkpointing per decoder layer: keep, recompute, or offload the layer input to the host.

Modes a user picks (``use_gradient_checkpointing`` / ``TrainConfig.gradient_checkpointing``):

- ``"off"``: every layer keeps its activations (fastest, most memory).
- ``"on"``: every layer keeps only its input and is recomputed in the backward pass.
- ``"offload"``: like ``"on"``, but the input itself goes to pinned host memory on a side CUDA stream and is
  prefetched back while the next layer's backward runs (on a CPU it is plain recomputation, still exact). A
  decoder layer is replayed one residual block at a time (:func:`_split_replay`), so the attention block's and
  the MLP block's saved tensors never coexist (``SPLIT_REPLAY = False``: the whole layer at once).
- ``"auto"`` (the default): :func:`plan_memory` decides per layer from the free device memory and an estimate
  of each layer's activation bytes (:func:`layer_activation_bytes`), so a big GPU never recomputes and a
  small one still fits. The plan is printed in one line the first time a batch shape needs it.

Every mode computes the same function: recomputation replays the layer with the RNG and autocast state of
the original forward. A replayed layer's output values are never read (only what its ops save for the
backward is), so the replay runs inside :func:`output_unused` and the layer skips its last projection's matmul.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from ..errors import PronghornError
from ..kernels.nf4 import NF4Weight, reuse_dequantized
from ..kernels.triton_support import reference_kernels, reference_only, scoped
from .pinned_host import pinned_empty

MODES = ("off", "on", "offload", "auto")
_ALIASES = {"unsloth": "offload", "true": "on", "false": "off", "none": "off"}
_GIB = 2**30
_OUTPUT_UNUSED = contextvars.ContextVar("pronghorn_output_unused", default=False)


def output_unused(enabled: bool = True):
    """Inside the block a decoder layer's output values are thrown away (it is replayed for its backward):
    the layer may return uninitialised values as long as its autograd graph and saved tensors are exact."""
    return scoped(_OUTPUT_UNUSED, enabled)


def layer_output_unused() -> bool:
    """True inside :func:`output_unused` (read by ``DecoderLayer.forward``)."""
    return _OUTPUT_UNUSED.get()


def parse_mode(value, modes: tuple[str, ...], aliases: dict[str, str]) -> str | None:
    """A user's on/off-style setting as one of ``modes``: ``True`` -> on, ``False``/``None`` -> off, a string
    (case and spaces ignored, ``aliases`` applied) as itself; None when it is none of them."""
    if value is None or value is False:
        return "off"
    if value is True:
        return "on"
    if isinstance(value, str):
        mode = aliases.get(value.strip().lower(), value.strip().lower())
        if mode in modes:
            return mode
    return None


def checkpoint_mode(value) -> str:
    """The mode for a user's setting: ``True`` -> on, ``False``/``None`` -> off, ``"unsloth"`` -> offload."""
    mode = parse_mode(value, MODES, _ALIASES)
    if mode is not None:
        return mode
    raise PronghornError(f"gradient checkpointing must be one of {MODES}, True, False or 'unsloth'; got {value!r}")


# --- the memory plan: pure arithmetic, testable with made-up numbers ---

def layer_activation_bytes(tokens: int, hidden: int, intermediate: int, q_dim: int, kv_dim: int, act_bytes: int,
                           lora_rank: int = 0, lora_projections: int = 0, lora_bytes: int = 4,
                           tiled_mlp: bool = False) -> int:
    """Bytes autograd keeps for one decoder layer's backward, for ``tokens`` = batch x sequence length.

    Per token: the layer input and the residual after attention (2 x hidden), both norm outputs (2 x hidden),
    q, the attention output and its head-merged copy (3 x q_dim), k and v (2 x kv_dim), gate, up and their
    product (3 x intermediate), all in the activation dtype; each adapted projection adds its rank-r product
    ``x A^T`` (``lora_bytes`` per element; the LoRA function saves no cast copy of its input). With the MLP
    tiled (models/tiled_mlp.py) the second norm's output and the MLP's tensors are not kept (pass only the
    attention's adapted projections then); their one-chunk transient is :func:`tiled_mlp_chunk_bytes`.
    """
    mlp = 0 if tiled_mlp else hidden + 3 * intermediate
    base = act_bytes * (3 * hidden + 3 * q_dim + 2 * kv_dim + mlp)
    return tokens * (base + lora_projections * lora_rank * lora_bytes)


def tiled_mlp_chunk_bytes(chunk: int, hidden: int, intermediate: int, act_bytes: int) -> int:
    """Peak bytes of one chunk's recomputation and backward in the tiled MLP: gate, up, their product and the
    three gradients (6 x intermediate), the chunk's norm output, MLP output and two gradients (4 x hidden)."""
    return chunk * act_bytes * (6 * intermediate + 4 * hidden)


@dataclass(frozen=True)
class MemoryPlan:
    modes: tuple[str, ...]  # per layer: keep | recompute | offload
    free_bytes: int
    need_bytes: int  # the estimated peak of this plan
    fits: bool

    def summary(self) -> str:
        counts = ", ".join(f"{self.modes.count(m)} {m}" for m in ("keep", "recompute", "offload"))
        note = "" if self.fits else " (may not fit: batch or sequence too large for this device)"
        return (f"{len(self.modes)} layers: {counts}; estimated {self.need_bytes / _GIB:.2f} GiB of "
                f"{self.free_bytes / _GIB:.2f} GiB free{note}")


def plan_memory(free_bytes: int, layers: int, layer_bytes: int, input_bytes: int, fixed_bytes: int = 0,
                can_offload: bool = True, headroom: float = 0.1) -> MemoryPlan:
    """Per-layer modes that fit ``free_bytes`` with the least recomputation.

    ``layer_bytes``: one layer's kept activations; ``input_bytes``: its input alone (what recomputation
    keeps); ``fixed_bytes``: the rest of a step's peak (loss, gradients in flight). ``headroom`` of the free
    memory stays unused (fragmentation, allocator rounding). Prefers keeping every layer; else recomputes the
    fewest layers; else moves the inputs of the earliest layers (needed last in the backward) to the host,
    with two layer inputs on the device for the prefetch. Layers are ordered offload, recompute, keep.
    """
    usable = free_bytes * (1 - headroom)
    budget = usable - fixed_bytes
    n, a, i = layers, layer_bytes, input_bytes
    if n * a <= budget:
        return MemoryPlan(("keep",) * n, free_bytes, fixed_bytes + n * a, True)
    # recompute the rest: inputs of every layer, activations of the kept ones, one layer rebuilt in the backward
    keep = min(n - 1, math.floor((budget - n * i - a) / (a - i))) if a > i else n - 1
    if keep >= 0 or not can_offload:
        keep = max(keep, 0)
        need = fixed_bytes + keep * a + (n - keep) * i + a
        return MemoryPlan(("recompute",) * (n - keep) + ("keep",) * keep, free_bytes, need, need <= usable)
    # offload the earliest inputs: the rest stay on the device, plus two in flight for the prefetch
    on_device = max(0, min(n, math.floor((budget - a - 2 * i) / i))) if i else n
    need = fixed_bytes + (on_device + 2) * i + a
    return MemoryPlan(("offload",) * (n - on_device) + ("recompute",) * on_device, free_bytes, need,
                      need <= usable)


def free_memory(device: torch.device) -> int | None:
    """Bytes new tensors can take on ``device``: the driver's free memory plus what PyTorch's allocator holds
    unused, within the process's memory fraction cap if one is set; host RAM available for a CPU; None when
    unknown."""
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
        free, total = torch.cuda.mem_get_info(device)
        reserved, allocated = torch.cuda.memory_reserved(device), torch.cuda.memory_allocated(device)
        fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda d: 1.0)(device)
        cap = int(fraction * total)  # torch.cuda.set_per_process_memory_fraction
        return min(free + reserved, cap) - allocated
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                info = dict(line.split(":", 1) for line in f)
            return int(info["MemAvailable"].split()[0]) * 1024
        except (OSError, KeyError, ValueError):
            return None
    return None


def activation_estimates(model, batch: int, seq_len: int, dtype: torch.dtype, device: torch.device,
                         mlp_chunk: int | None = None) -> tuple[int, int, int]:
    """(one layer's kept activations, one layer input, the rest of a step's peak) in bytes for a DecoderModel
    on ``batch`` x ``seq_len`` tokens; ``mlp_chunk``: tokens per chunk of the tiled MLP, None when untiled."""
    cfg, tokens, act = model.cfg, batch * seq_len, torch.empty((), dtype=dtype).element_size()
    scope = model.layers[0].self_attn if mlp_chunk else model.layers[0]  # tiled: the MLP keeps no LoRA products
    adapted = [m for m in scope.modules() if getattr(m, "has_lora", False)]
    rank = adapted[0].lora_A.shape[0] if adapted else 0
    autocast = torch.is_autocast_enabled(device.type)
    lora_dtype = torch.get_autocast_dtype(device.type) if autocast else adapted[0].lora_A.dtype if adapted else dtype
    layer = layer_activation_bytes(tokens, cfg.hidden_size, cfg.intermediate_size,
                                   cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim,
                                   act, rank, len(adapted), torch.empty((), dtype=lora_dtype).element_size(),
                                   tiled_mlp=bool(mlp_chunk))
    inputs = tokens * cfg.hidden_size * act
    # loss: a chunk of fp32 logits and its gradient; backward: a few fp32 hidden-sized gradients
    fixed = min(tokens, 4096) * cfg.vocab_size * 4 * 2 + 4 * tokens * cfg.hidden_size * 4
    if mlp_chunk:
        fixed += tiled_mlp_chunk_bytes(min(mlp_chunk, tokens), cfg.hidden_size, cfg.intermediate_size, act)
    return layer, inputs, fixed


def plan_for_model(model, batch: int, seq_len: int, dtype: torch.dtype, device: torch.device,
                   free_bytes: int | None = None, mlp_chunk: int | None = None) -> MemoryPlan:
    """The auto plan for a DecoderModel on a batch of ``batch`` x ``seq_len`` tokens."""
    layer, inputs, fixed = activation_estimates(model, batch, seq_len, dtype, device, mlp_chunk)
    free = free_memory(device) if free_bytes is None else free_bytes
    if free is None:
        return MemoryPlan(("keep",) * len(model.layers), 0, fixed + len(model.layers) * layer, True)
    return plan_memory(free, len(model.layers), layer, inputs, fixed, can_offload=device.type == "cuda")


def step_need(model, batch: int, seq_len: int, dtype: torch.dtype, device: torch.device, mode: str,
              mlp_chunk: int | None = None, headroom: float = 0.1) -> tuple[int, int | None]:
    """(estimated peak bytes of a training step in checkpointing ``mode``, usable free bytes or None when
    unknown), with the same estimates and headroom as the auto plan."""
    layer, inputs, fixed = activation_estimates(model, batch, seq_len, dtype, device, mlp_chunk)
    free, n = free_memory(device), len(model.layers)
    if mode == "auto":
        need = plan_memory(free or 0, n, layer, inputs, fixed, can_offload=device.type == "cuda").need_bytes
    elif mode == "off":
        need = fixed + n * layer
    else:  # on: every input stays; offload: two in flight on a GPU (a CPU keeps them all, as "on")
        need = fixed + layer + (2 if mode == "offload" and device.type == "cuda" else n) * inputs
    return need, None if free is None else int(free * (1 - headroom))


# --- running the layers ---

def layer_modes(model, x: torch.Tensor, mlp_chunk: int | None = None) -> tuple[str, ...] | None:
    """Per-layer modes for this forward of a DecoderModel, or None when nothing is checkpointed;
    ``mlp_chunk``: the tiled MLP's chunk for this forward (the auto plan budgets for it), None when untiled."""
    mode = checkpoint_mode(model.gradient_checkpointing)
    if mode == "off" or not (model.training and torch.is_grad_enabled()):
        return None
    n = len(model.layers)
    if mode == "on":
        return ("recompute",) * n
    if mode == "offload":
        return ("offload",) * n
    plans = model.__dict__.setdefault("_checkpoint_plans", {})
    seq = -(-x.shape[1] // 256) * 256  # lengths in buckets of 256 (planned for the bucket's end): few plans
    key = (x.shape[0], seq, x.dtype, x.device, torch.is_autocast_enabled(x.device.type), mlp_chunk)
    if key not in plans:
        plans[key] = plan_for_model(model, x.shape[0], seq, x.dtype, x.device, mlp_chunk=mlp_chunk)
        if plans[key].modes != model.__dict__.get("_checkpoint_logged"):  # one line per change of plan
            print(f"pronghorn: gradient checkpointing auto for batch {x.shape[0]} x {seq} tokens: "
                  f"{plans[key].summary()}", flush=True)
            model.__dict__["_checkpoint_logged"] = plans[key].modes
    modes = plans[key].modes
    return None if all(m == "keep" for m in modes) else modes


def run_layers(layers, x: torch.Tensor, args: tuple, modes: tuple[str, ...] | None) -> torch.Tensor:
    """``x`` through every layer (called as ``layer(x, *args)``) with the given per-layer modes."""
    if modes is None:
        for layer in layers:
            x = layer(x, *args)
        return x
    previous = None  # the host slot of the last offloaded layer: its backward runs right after ours
    reference = reference_only()  # recomputation (in autograd's thread) must take the same kernels
    for layer, mode in zip(layers, modes):
        if mode == "keep":
            x = layer(x, *args)
        elif mode == "recompute":
            x = checkpoint(layer, x, *args, use_reentrant=False, context_fn=lambda: (
                contextlib.nullcontext(), _replay_context(reference)))
        else:
            params = [p for p in layer.parameters() if p.requires_grad]
            if not params and not x.requires_grad:
                x = layer(x, *args)
                continue
            previous = _HostSlot(previous)
            x = _OffloadedLayer.apply(layer, args, previous, x, *params)
    return x


class _HostSlot:
    """One layer input parked in pinned host memory; ``fetch`` brings it back and starts the prefetch of
    the slot whose backward comes next (the previous layer's)."""

    _streams: dict = {}

    def __init__(self, previous: "_HostSlot | None"):
        self.previous, self.host, self.device_copy, self.ready, self.lease = previous, None, None, None, None

    @classmethod
    def _side_stream(cls, device: torch.device):
        if device not in cls._streams:
            cls._streams[device] = torch.cuda.Stream(device)
        return cls._streams[device]

    def store(self, x: torch.Tensor) -> None:
        self.device = x.device
        if not x.is_cuda:  # nothing to offload to: keep the input, recompute from it
            self.host = x.detach()
            return
        stream = self._side_stream(x.device)
        stream.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(stream):
            self.host, self.lease = pinned_empty(x.shape, x.dtype)
            self.host.copy_(x.detach(), non_blocking=True)
        x.record_stream(stream)  # the allocator must not reuse x before the copy is done

    def prefetch(self) -> None:
        if self.device_copy is not None or self.host is None or self.device.type != "cuda":
            return
        stream = self._side_stream(self.device)
        with torch.cuda.stream(stream):
            self.device_copy = self.host.to(self.device, non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record(stream)
        if self.lease is not None:  # its copies are queued on the side stream: the next store may reuse it
            self.host, self.lease = None, self.lease.release()

    def fetch(self) -> torch.Tensor:
        if self.device.type != "cuda":
            x, self.host = self.host, None
            return x
        self.prefetch()
        current = torch.cuda.current_stream(self.device)
        current.wait_event(self.ready)
        x, self.device_copy, self.host = self.device_copy, None, None
        x.record_stream(current)
        if self.previous is not None:
            self.previous.prefetch()
        return x


class _OffloadedLayer(torch.autograd.Function):
    """A layer whose input is parked in a :class:`_HostSlot` and which is recomputed in the backward.
    The layer's trainable parameters are inputs, so their gradients flow even when ``x`` needs none."""

    @staticmethod
    def forward(ctx, layer, args, slot: _HostSlot, x, *params):
        ctx.layer, ctx.args, ctx.slot, ctx.reference = layer, args, slot, reference_only()
        ctx.rng = _rng_state(x.device)
        ctx.autocast = (torch.is_autocast_enabled(x.device.type), torch.get_autocast_dtype(x.device.type))
        slot.store(x)
        return layer(x, *args)

    @staticmethod
    def backward(ctx, grad):
        x = ctx.slot.fetch().detach().requires_grad_(ctx.needs_input_grad[3])
        params = [p for p in ctx.layer.parameters() if p.requires_grad]
        device = x.device
        reuse = reuse_dequantized() if _can_keep_dense_weights(ctx.layer, device) else contextlib.nullcontext()
        with reuse:  # an NF4 layer: the replay's dequantized weights serve its backward too
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], device_type=device.type):
                replay = _split_replay if SPLIT_REPLAY and hasattr(ctx.layer, "mlp_block") else _whole_replay
                grads = replay(ctx, x, params, grad)
        gx = grads.pop(0) if x.requires_grad else None
        return (None, None, None, gx, *grads)


SPLIT_REPLAY = True  # offload mode replays a decoder layer's two residual blocks apart (see _split_replay)


def _replaying(ctx, device: torch.device, graph: bool = True, from_forward_rng: bool = True):
    """A replay under the forward's autocast and kernel choice. ``graph``: with autograd, values thrown away (only
    what the ops save counts: ``output_unused``); else without, values used. ``from_forward_rng``: restart the
    RNG stream from the forward's state (else continue the current one)."""
    if from_forward_rng:
        _set_rng_state(device, ctx.rng)
    stack = contextlib.ExitStack()
    stack.enter_context(torch.enable_grad() if graph else torch.no_grad())
    stack.enter_context(torch.autocast(device.type, ctx.autocast[1], enabled=ctx.autocast[0]))
    stack.enter_context(_replay_context(ctx.reference) if graph else reference_kernels(ctx.reference))
    return stack


def _whole_replay(ctx, x: torch.Tensor, params: list, grad: torch.Tensor) -> list:
    """Gradients of ([x], *params) from one replay of the whole layer."""
    with _replaying(ctx, x.device):
        out = ctx.layer(x, *ctx.args)
    return list(torch.autograd.grad(out, ([x] if x.requires_grad else []) + params, grad, allow_unused=True))


def _split_replay(ctx, x: torch.Tensor, params: list, grad: torch.Tensor) -> list:
    """Gradients of ([x], *params) with a decoder layer replayed one residual block at a time: the attention
    block's output is recomputed without a graph, the MLP block is replayed and back-propagated, then the
    attention block is. So the two blocks' saved tensors never coexist: the layer's backward peak is the larger
    block's, not their sum, for one more attention-block forward (about a fifth of a Llama layer's FLOPs). The
    values are the whole replay's: the same ops on the same inputs and RNG stream (the attention block starts
    from the forward's RNG state both times, the MLP block continues where the first one left it)."""
    layer, (cos, sin, masks, cache, mlp_chunk) = ctx.layer, ctx.args
    with _replaying(ctx, x.device, graph=False):
        mid = layer.attention_block(x, cos, sin, masks, cache)
    mid.requires_grad_()
    with _replaying(ctx, x.device, from_forward_rng=False):
        out = layer.mlp_block(mid, mlp_chunk)
    d_mid, *mlp_grads = torch.autograd.grad(out, [mid] + params, grad, allow_unused=True)
    del out, mid
    with _replaying(ctx, x.device):
        out = layer.attention_block(x, cos, sin, masks, cache, output_unused=True)
    attn_grads = list(torch.autograd.grad(out, ([x] if x.requires_grad else []) + params, d_mid, allow_unused=True))
    del out
    gx = [attn_grads.pop(0)] if x.requires_grad else []
    return gx + [a if m is None else m if a is None else a + m for a, m in zip(attn_grads, mlp_grads)]


def _can_keep_dense_weights(layer, device: torch.device) -> bool:
    """True for a layer with NF4 weights whose dense copies (bf16) take at most a quarter of the free memory."""
    dense = layer.__dict__.get("_nf4_dense_bytes")
    if dense is None:
        dense = sum(2 * m.weight.numel() for m in layer.modules() if isinstance(getattr(m, "weight", None), NF4Weight))
        layer.__dict__["_nf4_dense_bytes"] = dense
    if not dense:
        return False
    free = free_memory(device)
    return free is not None and 4 * dense <= free


@contextlib.contextmanager
def _replay_context(reference: bool):
    """A layer's replay for its backward: the forward's kernel choice, output values unused."""
    with reference_kernels(reference), output_unused():
        yield


def _rng_state(device: torch.device):
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(device: torch.device, state) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)
