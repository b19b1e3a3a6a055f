"""Activation recompute per decoder layer: keep, recompute, or offload the layer input to the host.

Modes a user picks (``use_gradient_checkpointing`` / ``TrainConfig.gradient_checkpointing``):

- ``"off"``: every layer keeps its activations (fastest, most memory).
- ``"on"``: every layer keeps only its input and is replayed in the backward pass.
- ``"offload"``: like ``"on"``, but the input itself goes to pinned host memory on a side CUDA stream and is
  prefetched back while the next layer's backward runs (on a CPU it is plain recomputation, still exact). The
  MLP block's input is parked there too (unless the plan says ``park_offloaded=False``), so the layer is replayed
  one residual block at a time at no extra forward: less work than a whole-layer replay (o_proj's matmul is
  skipped as well as down_proj's) and the smaller peak of a split replay.
- ``"auto"`` (the default): the memory plan (models/memory_plan.py) picks per layer from the budget.

How a step runs is the :class:`~pronghorn.models.memory_plan.MemoryPlan` handed to :func:`run_layers`: the
per-layer modes, and for a replayed layer whether its two residual blocks are replayed apart
(:func:`_split_replay`: the attention block's and the MLP block's saved tensors never coexist) and whether an NF4
layer keeps the weights its replay dequantized for its backward. A replayed layer's adapters are cast to their
compute dtype once, in its forward; the replays take those operands (kernels/adapter_operands.py).

On a GPU the plan may run the replayed layers as CUDA graphs (``plan.replay_graphs``, models/replay_graphs.py):
a replayed layer's forward and its replay with backward each become one launch, bitwise the eager ones.

Every mode computes the same function: a replay runs with the RNG and autocast state of the original forward.
A replayed layer's output values are never read (only what its ops save for the backward is), so the replay is
called with ``output_unused=True`` and the layer skips its last projection's matmul.
"""

from __future__ import annotations

import contextlib

import torch

from ..errors import PronghornError
from ..kernels.adapter_operands import open_store, operands_kept
from ..kernels.nf4 import dequantized_once
from .memory_plan import MemoryPlan
from .pinned_host import pinned_empty
from .replay_graphs import layer_state

MODES = ("off", "on", "offload", "auto")
_ALIASES = {"unsloth": "offload", "true": "on", "false": "off", "none": "off"}


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


# --- running the layers ---

def run_layers(layers, x: torch.Tensor, args: tuple, plan: MemoryPlan | None, graphs=None, kept=None) -> torch.Tensor:
    """``x`` through every layer (called as ``layer(x, *args)``) as ``plan`` says (None: keep everything).
    ``graphs``: a :class:`~pronghorn.models.replay_graphs.ReplayGraphs` that runs the replays (with
    ``plan.replay_graphs``), else None; ``kept``: a :class:`~pronghorn.models.kept_graphs.KeptGraphs` that runs
    the kept layers, the top ones (with ``plan.kept_graphs``), else None."""
    modes = plan.layers if plan is not None else ("keep",) * len(layers)
    first_kept = len(layers)  # the kept layers at the top
    while first_kept and modes[first_kept - 1] == "keep":
        first_kept -= 1
    top = layers if first_kept == 0 else layers[first_kept:]  # (no slice made on the common path: decoding too)
    x = _replayed(layers[:first_kept], x, args, plan, graphs) if first_kept else x
    out = kept.run(top, x, args) if kept is not None and len(top) else None
    if out is not None:
        return out
    for layer in top:
        x = layer(x, *args)
    return x


def _replayed(layers, x: torch.Tensor, args: tuple, plan: MemoryPlan, graphs) -> torch.Tensor:
    """``x`` through the layers below the kept ones at the top (``plan.layers`` from the first)."""
    previous = None  # the host slot fetched last in the backward of the last offloaded layer: ours come next
    for layer, mode in zip(layers, plan.layers):
        params = layer_state(layer)[0]  # trainable, in parameters() order
        if mode == "keep" or (not params and not x.requires_grad):
            x = layer(x, *args)
            continue
        slot = _HostSlot(previous) if mode == "offload" else _DeviceSlot()
        mid_slot = None
        if mode == "offload" and plan.splits(mode) and hasattr(layer, "mlp_block"):
            mid_slot = _HostSlot(slot)  # fetched first in the backward: it prefetches the layer input
        previous = (mid_slot or slot) if mode == "offload" else previous
        x = _ReplayedLayer.apply(layer, args, slot, mid_slot, plan, graphs, x, *params)
    return x


class _DeviceSlot:
    """A recomputed layer's input, kept on its device."""

    def store(self, x: torch.Tensor) -> None:
        self.x = x.detach()

    def fetch(self) -> torch.Tensor:
        x, self.x = self.x, None
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


class _ReplayedLayer(torch.autograd.Function):
    """A layer whose input is parked in a slot (:class:`_DeviceSlot` or :class:`_HostSlot`) and which is replayed
    in the backward as ``plan`` says. The layer's trainable parameters are inputs, so their gradients flow even
    when ``x`` needs none."""

    @staticmethod
    def forward(ctx, layer, args, slot, mid_slot, plan: MemoryPlan, graphs, x, *params):
        ctx.layer, ctx.args, ctx.slot, ctx.mid_slot, ctx.plan, ctx.graphs = layer, args, slot, mid_slot, plan, graphs
        ctx.rng = rng_state(x.device)
        ctx.autocast = (torch.is_autocast_enabled(x.device.type), torch.get_autocast_dtype(x.device.type))
        slot.store(x)
        # the adapters' operands of this forward, taken again by an eager replay (a graph makes its own: it reads
        # fixed memory; the store is dropped after the forward then, and the plan does not count it)
        ctx.operands = open_store()  # the model's step store (kernels/step_operands.py), else the layer's own
        if graphs is not None:
            out = graphs.forward(layer, x, args, mid_slot is not None)
            if out is not None:
                out, mid = out
                if mid_slot is not None:
                    ctx.rng_mid = ctx.rng  # no random draws in a graphed layer: the state is the same
                    mid_slot.store(mid)
                return out
        with operands_kept(ctx.operands):
            if mid_slot is None:
                out = layer(x, *args)
            else:
                cos, sin, masks, cache, mlp_chunk = args  # DecoderLayer.forward, one block at a time
                mid = layer.attention_block(x, cos, sin, masks, cache)
                ctx.rng_mid = rng_state(x.device)  # where the MLP block's random stream starts
                mid_slot.store(mid)
                out = layer.mlp_block(mid, mlp_chunk)
        if graphs is not None:
            ctx.operands = None
        return out

    @staticmethod
    def backward(ctx, grad):
        need_x = ctx.needs_input_grad[6]
        # a parked MLP input is fetched first (that starts the prefetch of the layer input); the layer input is
        # fetched when the replay first needs it (a split replay from a parked input: after the MLP block)
        mid = None if ctx.mid_slot is None else ctx.mid_slot.fetch()
        params = layer_state(ctx.layer)[0]
        split = (ctx.plan.split_replay or mid is not None) and hasattr(ctx.layer, "mlp_block")
        if ctx.graphs is not None:
            ctx.operands = None
            replay = _split_replay if split else _whole_replay
            grads = ctx.graphs.backward(ctx, grad, mid, need_x, params, split, replay)
            if grads is not None:
                gx = grads.pop(0) if need_x else None
                return (None, None, None, None, None, None, gx, *grads)
        layer_input = lambda: ctx.slot.fetch().detach().requires_grad_(need_x)  # noqa: E731
        device = grad.device
        weights = [m.weight for m in ctx.layer.modules() if ctx.plan.reuse_dequantized and hasattr(m, "weight")]
        with dequantized_once(weights), operands_kept(ctx.operands):  # an NF4 layer: the replay's dequantized
            # weights serve its backward too; the adapters' operands are the forward's
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], device_type=device.type):
                grads = (_split_replay if split else _whole_replay)(ctx, layer_input, params, grad, mid)
        ctx.operands = None
        gx = grads.pop(0) if need_x else None
        return (None, None, None, None, None, None, gx, *grads)


def _replaying(ctx, device: torch.device, graph: bool = True, from_forward_rng: bool = True):
    """A replay under the forward's autocast (the kernels are the layers' own ``kernel_policy``). ``graph``: with autograd (the caller passes
    ``output_unused=True``: only what the ops save counts); else without. ``from_forward_rng``: restart the RNG
    stream from the forward's state (else continue the current one)."""
    if from_forward_rng:
        set_rng_state(device, ctx.rng)
    stack = contextlib.ExitStack()
    stack.enter_context(torch.enable_grad() if graph else torch.no_grad())
    # a graph's capture caches no autocast casts (they would be freed into its pool; the values are the same)
    cache = not getattr(ctx, "in_graph", False)
    stack.enter_context(torch.autocast(device.type, ctx.autocast[1], enabled=ctx.autocast[0], cache_enabled=cache))
    return stack


def _whole_replay(ctx, layer_input, params: list, grad: torch.Tensor, mid=None) -> list:
    """Gradients of ([x], *params) from one replay of the whole layer (``layer_input()`` gives x)."""
    x = layer_input()
    with _replaying(ctx, x.device):
        out = ctx.layer(x, *ctx.args, output_unused=True)
    return list(torch.autograd.grad(out, ([x] if x.requires_grad else []) + params, grad, allow_unused=True))


def _split_replay(ctx, layer_input, params: list, grad: torch.Tensor, mid: torch.Tensor | None = None) -> list:
    """Gradients of ([x], *params) with a decoder layer replayed one residual block at a time: the attention
    block's output is recomputed without a graph, the MLP block is replayed and back-propagated, then the
    attention block is. So the two blocks' saved tensors never coexist: the layer's backward peak is the larger
    block's, not their sum, for one more attention-block forward (about a fifth of a Llama layer's FLOPs). An
    offloaded layer parks that output (``mid``, the MLP block's input) on the host beside its input instead, and
    skips the extra forward. The values are the whole replay's: the same ops on the same inputs and RNG stream
    (the attention block starts from the forward's RNG state both times, the MLP block continues where the first
    one left it, or from the state the forward saw there)."""
    layer, (cos, sin, masks, cache, mlp_chunk) = ctx.layer, ctx.args
    device, parked = grad.device, mid is not None
    if not parked:
        x = layer_input()
        with _replaying(ctx, device, graph=False):
            mid = layer.attention_block(x, cos, sin, masks, cache)
    else:
        set_rng_state(device, ctx.rng_mid)
    mid = mid.detach().requires_grad_()
    with _replaying(ctx, device, from_forward_rng=False):
        out = layer.mlp_block(mid, mlp_chunk, output_unused=True)
    d_mid, *mlp_grads = torch.autograd.grad(out, [mid] + params, grad, allow_unused=True)
    del out, mid
    if parked:  # the layer input was prefetched while the MLP block ran
        x = layer_input()
    with _replaying(ctx, x.device):
        out = layer.attention_block(x, cos, sin, masks, cache, output_unused=True)
    attn_grads = list(torch.autograd.grad(out, ([x] if x.requires_grad else []) + params, d_mid, allow_unused=True))
    del out
    gx = [attn_grads.pop(0)] if x.requires_grad else []
    return gx + [a if m is None else m if a is None else a + m for a, m in zip(attn_grads, mlp_grads)]


def rng_state(device: torch.device):
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def set_rng_state(device: torch.device, state) -> None:
    """Restore ``state`` (:func:`rng_state`'s); None: nothing to restore (a replay that draws no random numbers)."""
    if state is None:
        return
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)
