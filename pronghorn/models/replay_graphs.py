"""CUDA graphs of replayed layers: a layer's recompute and backward launched as one graph.

A step under a tight budget replays most layers in its backward (models/recompute.py). Each replay launches a few
hundred small kernels from Python: about 1 ms of host time a layer on Gemma 3 (docs/benchmarks.md, session 15),
so a budgeted step of a small model, or on a slow host, waits on the host rather than the GPU (the 1B profile of
session 9: 72 of 204 ms idle). A captured graph launches the same kernels at once.

How it runs (:class:`ReplayGraphs`, one per model, used when the memory plan says ``replay_graphs``):

- One graph per layer and shape: a layer's first replay with a shape runs eagerly (kernels compiled and tuned,
  handles made), the next one with the same shape in the following step is captured and then replayed (shapes
  that change every step, batches padded to their longest row, stay eager: no capture that is not replayed). A layer whose tensors move (a new adapter, a load)
  is captured again, at most :data:`MAX_CAPTURES` times in all; then it stays eager.
- Static buffers per shape, shared by the layers: the layer input (and an offloaded layer's parked MLP input),
  the output gradient, the input gradient, the step's RoPE tables and masks (copied once a step), and one flat
  buffer per dtype for a layer's parameter gradients. Before a replay the inputs are copied in; after it the
  input gradient and the flat gradients are cloned out (two kernels), so nothing a caller keeps is overwritten.
- One memory pool shared by every graph: a capture leaves nothing allocated in the pool (its results go to the
  static buffers), so the pool holds one replay's transients and every graph reuses them.

Exactness: a graph runs the eager replay's kernels on the same values, so the gradients are the eager ones bit
for bit (tests/models/test_replay_graphs.py). The replay inside a graph makes the adapters' operands itself from
the live adapters (a graph cannot read the forward's, which are new tensors each step). Graphs are used only
where nothing draws random numbers (no dropout), never for a tiled MLP (its backward restores RNG states), and
not under torch.distributed (FSDP moves the parameters every step): :func:`graphs_possible`.

Memory: the pool and the static buffers stay reserved for the whole step, the loss included; the memory plan
counts them and takes graphs only where they fit (``MemoryPlan.replay_graphs``). ``torch.cuda.max_memory_allocated``
does not see the pool between replays: :meth:`ReplayGraphs.pool_bytes` says what it holds.

On by default (``DecoderModel.replay_graphs`` "auto"; ``gradient_checkpointing_enable(replay_graphs="off")``
turns them off, and the kept layers' graphs with them): on Gemma-3-4B at
Unsloth's peak (H100, session 18) the plan with graphs ran 1.12x the eager one, and every layer replayed 1.81x; on
the 1B row at Unsloth's peak (session 16) 0.98x, where the pool (a whole replayed layer's backward, 0.69 GiB) cost
the plan what the graphs saved.
"""

from __future__ import annotations

import contextlib
import warnings
from types import SimpleNamespace

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ..kernels.adapter_operands import operands_kept
from ..kernels.nf4 import dequantized_once
from .allocator import note_graph

MAX_CAPTURES = 3  # per layer and shape: the first capture and two after its tensors moved
MAX_SHAPES = 2  # shapes with graphs and static buffers at once (batches of varying length: the latest two)
GRAPH_SETTINGS = ("auto", "off")  # DecoderModel.replay_graphs / kept_graphs_setting: the plan may take graphs | never


def module_signature(module: nn.Module) -> tuple:
    """What a graph captured over ``module`` depends on besides shapes: its parameters' and buffers' storage,
    dtypes, shapes and whether they train (a graph's backward returns the gradients it was captured for), and
    its adapters' switches."""
    return layer_state(module)[1]


def layer_state(module: nn.Module) -> tuple[list, tuple]:
    """(``module``'s trainable parameters in ``parameters()`` order, its :func:`module_signature`) from one walk.

    The graphs ask for both at every step for every layer, before the first layer's graph launches: host time
    with the GPU idle. ``parameters()``, ``buffers()`` and ``modules()`` each build every submodule's name and
    ``hasattr`` misses raise inside ``nn.Module``; one walk over the ``_modules`` / ``_parameters`` / ``_buffers``
    dicts gives the same lists (pre-order, each tensor once) at a fraction of the cost (16 LoRA layers on a loaded
    2-core CPU: 3.1 ms -> about 1.2 ms a step; tests/models/test_replay_graphs.py checks the lists against torch's)."""
    params, tensors, adapters, seen = [], [], [], set()
    for m in _submodules(module):
        d = m.__dict__
        for trainable, group in ((True, d["_parameters"]), (False, d["_buffers"])):
            for t in group.values():
                if t is None or id(t) in seen:
                    continue
                seen.add(id(t))
                tensors.append((t.data_ptr(), t.dtype, t.shape, t.requires_grad))
                if trainable and t.requires_grad:
                    params.append(t)
        if "lora_enabled" in d or hasattr(type(m), "lora_enabled"):
            adapters.append((m.lora_enabled, getattr(m, "lora_scaling", None)))
    return params, (tuple(tensors), tuple(adapters))


def _submodules(module: nn.Module) -> list[nn.Module]:
    """``list(module.modules())`` (pre-order, each module once) without building the names."""
    out, seen, stack = [], set(), [module]
    while stack:
        m = stack.pop()
        if id(m) in seen:
            continue
        seen.add(id(m))
        out.append(m)
        stack.extend(reversed([c for c in m.__dict__["_modules"].values() if c is not None]))
    return out


def graphs_possible(layers: nn.ModuleList, device: torch.device) -> bool:
    """Whether replayed layers may run as graphs: on a GPU; no random draws in the layers (dropout); not under
    torch.distributed."""
    if device.type != "cuda":
        return False
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return False
    # Called by every training step's plan_step, before its first kernel: on this path host time is GPU idle time.
    # So the walk builds no names and the adapters' dropout, a plain attribute, is read from ``__dict__`` (a getattr
    # that misses raises inside nn.Module). 8B on a CPU: 1.38 ms a step before, about 0.2 ms now.
    for m in _submodules(layers):
        if isinstance(m, nn.Dropout) and m.p > 0:
            return False
        if m.__dict__.get("lora_dropout", 0.0) and getattr(m, "lora_A", None) is not None:
            return False
    return True


@contextlib.contextmanager
def own_leaves(module: nn.Module, params: list):
    """Inside the block ``module``'s parameters among ``params`` are new leaves on the same memory (yielded in the
    order of ``params``), so a graph's capture differentiates to gradient nodes of its own. A parameter's own node
    was made with the training step's forward, on the default stream, and kept alive by that step's graph: a
    gradient from the capture stream reaching it makes the engine sync the streams, which invalidates the capture
    (session 16, H100: ``cudaErrorStreamCaptureInvalidated``)."""
    wanted = {id(p) for p in params}
    aliases, swapped = {}, []
    for m in module.modules():
        for name, p in list(m._parameters.items()):
            if p is not None and id(p) in wanted:
                if id(p) not in aliases:
                    aliases[id(p)] = nn.Parameter(p.detach(), requires_grad=True)
                m._parameters[name] = aliases[id(p)]
                swapped.append((m, name, p))
    try:
        yield [aliases.get(id(p), p) for p in params]
    finally:
        for m, name, p in swapped:
            m._parameters[name] = p


class CudaGraph:
    """A captured CUDA graph of ``body``, in ``pool`` (the capture runs no kernel: replay it)."""

    runs_at_capture = False

    def capture(self, body, pool):
        self.graph = torch.cuda.CUDAGraph()
        note_graph(self.graph)
        with torch.cuda.graph(self.graph, pool=pool, capture_error_mode="thread_local"):
            return body()

    def replay(self) -> None:
        self.graph.replay()


class EagerGraph:
    """A stand-in with a graph's interface that runs ``body`` at each replay: the static-buffer plumbing on a
    CPU (tests)."""

    runs_at_capture = True

    def capture(self, body, pool):
        self.body = body
        return body()

    def replay(self) -> None:
        self.body()


class StaticArgs:
    """The step's layer arguments (RoPE tables, masks) in static buffers, copied in once a step."""

    def __init__(self, leaves: list, spec):
        self.leaves = [t.clone() if isinstance(t, torch.Tensor) else t for t in leaves]
        self.args = pytree.tree_unflatten(self.leaves, spec)
        self.source = None  # the argument tuple last copied in

    def load_args(self, args, leaves: list) -> None:
        if args is self.source:
            return
        for static, t in zip(self.leaves, leaves):
            if isinstance(t, torch.Tensor):
                static.copy_(t)
        self.source = args


class _Statics(StaticArgs):
    """The static buffers of one shape: inputs, outputs, and the step's layer arguments."""

    def __init__(self, grad: torch.Tensor, mid: bool, leaves: list, spec):
        super().__init__(leaves, spec)
        self.x, self.grad, self.gx = torch.empty_like(grad), torch.empty_like(grad), torch.empty_like(grad)
        self.mid = torch.empty_like(grad) if mid else None


class LayerGraph:
    """A layer's captured graph, what it was captured over, and where it leaves the parameter gradients: a slot per
    parameter (``views``, None where the parameter gets none) in the first ``used[dtype]`` elements of ``flats``."""

    def __init__(self, graph, signature, views: list, present: list, need_x: bool):
        self.graph, self.signature, self.need_x = graph, signature, need_x
        self.views = [v if p else None for v, p in zip(views, present)]
        self.flats = {v.dtype: v._base for v in views if v._base is not None}
        self.used = {}
        for v in views:
            self.used[v.dtype] = max(self.used.get(v.dtype, 0), v.storage_offset() + v.numel())


class GraphSet:
    """What a model's graphs of layers share (these replays', models/kept_graphs.py's kept layers'): the graph
    type (:class:`CudaGraph`, or the CPU stand-in), one memory pool, the flat parameter-gradient buffers, the
    step's arguments flattened once, and whether a capture failed."""

    def __init__(self, graph_type=CudaGraph):
        self.graph_type = graph_type
        self.pool = None
        self.flat: dict = {}  # dtype -> the parameter-gradient buffer
        self.failed: str | None = None  # a capture failed: every layer runs eagerly
        self._args = (None, None, None, None)  # (args, leaves, spec, their key) of the last call

    def pool_bytes(self) -> int:
        """Bytes the graphs' memory pool holds beyond its live tensors: reserved for the step, unseen by
        ``max_memory_allocated`` (a replayed layer's graphs leave nothing live in it: all of it; kept layers' keep
        their saved tensors there, which the allocated count sees)."""
        if self.pool is None or not torch.cuda.is_available():
            return 0
        pool = tuple(self.pool)
        return sum(s["total_size"] - s["allocated_size"] for s in torch.cuda.memory_snapshot()
                   if tuple(s.get("segment_pool_id", ())) == pool)

    def _flatten(self, args):
        if args is self._args[0]:
            return self._args[1:]
        leaves, spec = pytree.tree_flatten(args)
        meta = []
        for t in leaves:
            if isinstance(t, torch.Tensor):
                meta.append((tuple(t.shape), t.dtype, t.device))
            elif t is None or isinstance(t, (bool, int, float, str)):
                meta.append(t)
            else:  # something a graph cannot key on (a cache object): eager
                self._args = (args, leaves, spec, None)
                return self._args[1:]
        self._args = (args, leaves, spec, (str(spec), tuple(meta)))
        return self._args[1:]

    def _views(self, params: list) -> list:
        """Each parameter's gradient slot in the flat buffer of its dtype (grown when too small)."""
        sizes: dict = {}
        for p in params:
            sizes[p.dtype] = sizes.get(p.dtype, 0) + p.numel()
        for dtype, n in sizes.items():
            if dtype not in self.flat or self.flat[dtype].numel() < n:
                self.flat[dtype] = torch.empty(n, dtype=dtype, device=params[0].device)
        offsets: dict = {}
        views = []
        for p in params:
            start = offsets.get(p.dtype, 0)
            views.append(self.flat[p.dtype][start:start + p.numel()].view(p.shape))
            offsets[p.dtype] = start + p.numel()
        return views

    def _outputs(self, entry: LayerGraph, statics: _Statics | None) -> list:
        """The input gradient and the parameter gradients, cloned out of the static buffers (one kernel each
        and per dtype): the next replay overwrites those, and autograd may keep what it is given as ``.grad``."""
        out = [statics.gx.clone()] if entry.need_x else []
        copies = {dtype: entry.flats[dtype][:n].clone() for dtype, n in entry.used.items()}
        for view in entry.views:
            start = None if view is None else view.storage_offset()
            out.append(None if view is None else copies[view.dtype][start:start + view.numel()].view(view.shape))
        return out


class ReplayGraphs(GraphSet):
    """A model's replay graphs: :meth:`forward` gives a replayed layer's output from its graph, :meth:`backward`
    its gradients; None when the layer runs eagerly this time."""

    def __init__(self, graph_type=CudaGraph):
        super().__init__(graph_type)
        self.layers: dict = {}  # (id(layer), shape, how it replays) -> "seen" | "eager" | LayerGraph
        self.captures: dict = {}  # the same keys -> captures so far
        self.statics: dict = {}  # shape -> _Statics
        self.previous: dict = {}  # (id(layer), how it replays) -> the shape of its last call

    def forward(self, layer: nn.Module, x: torch.Tensor, args: tuple, parked: bool):
        """(output, parked MLP input or None) of a replayed layer's forward (``layer(x, *args)``, or its two blocks
        apart when ``parked``), from its graph; None: run it eagerly. Called inside the autograd Function's
        forward (no graph of ops is recorded), under the caller's autocast."""
        device = x.device.type
        autocast = (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        prepared = self._prepare(layer, x, parked, args, ("forward", autocast))
        if prepared is None:
            return None
        slot, entry, signature, statics = prepared
        statics.x.copy_(x)

        def body() -> list:
            with operands_kept({}), torch.autocast(device, autocast[1], enabled=autocast[0], cache_enabled=False):
                if parked:
                    cos, sin, masks, cache, mlp_chunk = statics.args  # DecoderLayer.forward, a block at a time
                    mid = layer.attention_block(statics.x, cos, sin, masks, cache)
                    statics.mid.copy_(mid)
                    out = layer.mlp_block(mid, mlp_chunk)
                else:
                    out = layer(statics.x, *statics.args)
                statics.gx.copy_(out)
            return []

        if entry == "seen":
            entry = self._capture(slot, signature, body, [], False)
            if entry is None:
                body()
        if entry is not None:
            entry.graph.replay()
        # copies out: the next layer's replay overwrites the buffers (a parked input is copied to the host on a
        # side stream after this returns)
        return statics.gx.clone(), statics.mid.clone() if parked else None

    def backward(self, ctx, grad: torch.Tensor, mid: torch.Tensor | None, need_x: bool, params: list, split: bool,
                 replay) -> list | None:
        """([input gradient], *parameter gradients) of the replayed layer of ``ctx`` (models/recompute.py), from
        its graph; None: replay it eagerly (``ctx.slot`` not fetched yet). ``replay``: the eager replay function
        (``_whole_replay`` / ``_split_replay``) the graph captures."""
        how = ("backward", need_x, split, ctx.autocast, ctx.plan.reuse_dequantized)
        prepared = self._prepare(ctx.layer, grad, mid is not None, ctx.args, how)
        if prepared is None:
            return None
        slot, entry, signature, statics = prepared
        x = ctx.slot.fetch()
        statics.x.copy_(x)
        del x
        statics.grad.copy_(grad)
        if mid is not None:
            statics.mid.copy_(mid)
        if entry == "seen":
            views = self._views(params)
            body = self._backward_body(ctx, statics, need_x, params, views, replay)
            entry = self._capture(slot, signature, body, views, need_x)
            if entry is None:  # replayed eagerly from the inputs already copied in
                return self._outputs(LayerGraph(None, None, views, body(), need_x), statics)
        entry.graph.replay()
        return self._outputs(entry, statics)

    # --- internals ---

    def _prepare(self, layer: nn.Module, like: torch.Tensor, parked: bool, args: tuple, how: tuple):
        """(slot, entry, signature, static buffers with ``args`` copied in) for a graph of ``layer`` over tensors
        shaped as ``like``; None: run eagerly this time (the first time, a warm-up; or graphs off)."""
        if self.failed is not None:
            return None
        leaves, spec, arg_key = self._flatten(args)
        if arg_key is None:
            return None
        shape = (tuple(like.shape), like.dtype, like.device, parked, arg_key)  # the static buffers'
        slot = (id(layer), shape, *how)
        entry = self.layers.get(slot)
        repeated = self.previous.get((id(layer), *how)) == shape
        self.previous[(id(layer), *how)] = shape
        if entry is None or entry == "eager":
            self.layers[slot] = entry or "seen"  # the first run of this shape is eager: the warm-up
            return None
        signature = module_signature(layer)
        if isinstance(entry, LayerGraph) and entry.signature != signature:
            entry = "seen"  # its tensors moved: capture again
        if entry == "seen" and not repeated:  # a shape that changes from step to step (batches padded to their
            return None  # longest row) stays eager: a capture pays only when the next step has the same shape
        statics = self.statics.pop(shape, None)
        if statics is None:
            self._evict(MAX_SHAPES - 1)
            statics = _Statics(like, parked, leaves, spec)
        self.statics[shape] = statics  # the most recent last
        statics.load_args(args, leaves)
        return slot, entry, signature, statics

    def _evict(self, keep: int) -> None:
        """Drop the graphs and buffers of all but the ``keep`` shapes used last."""
        while len(self.statics) > keep:
            old = next(iter(self.statics))
            del self.statics[old]
            for slot in [slot for slot in self.layers if slot[1] == old]:
                del self.layers[slot]

    def _backward_body(self, ctx, statics: _Statics, need_x: bool, params: list, views: list, replay):
        weights = [m.weight for m in ctx.layer.modules() if ctx.plan.reuse_dequantized and hasattr(m, "weight")]
        graph_ctx = SimpleNamespace(layer=ctx.layer, args=statics.args, plan=ctx.plan, autocast=ctx.autocast,
                                    rng=None, rng_mid=None, in_graph=True)  # no random draws: no RNG to restore

        def body() -> list[bool]:
            layer_input = lambda: statics.x.detach().requires_grad_(need_x)  # noqa: E731
            with dequantized_once(weights), operands_kept({}), own_leaves(ctx.layer, params) as leaves:
                grads = replay(graph_ctx, layer_input, leaves, statics.grad, statics.mid)
            if need_x:
                statics.gx.copy_(grads.pop(0))
            present = []
            for g, view in zip(grads, views):
                if g is not None:
                    view.copy_(g)
                present.append(g is not None)
            return present

        return body

    def _capture(self, slot, signature, body, views: list, need_x: bool):
        """A graph of ``body`` (its result: which parameter gradients it writes), or None when this layer stays
        eager (captured too often) or the capture failed (then every layer does)."""
        count = self.captures.get(slot, 0)
        if count >= MAX_CAPTURES:
            self.layers[slot] = "eager"
            return None
        self.captures[slot] = count + 1
        graph = self.graph_type()
        if self.pool is None and isinstance(graph, CudaGraph):
            self.pool = torch.cuda.graph_pool_handle()
        try:
            present = graph.capture(body, self.pool)
        except Exception as e:  # noqa: BLE001 - anything the replay does that a graph cannot hold
            self.failed = f"{type(e).__name__}: {e}"
            self.layers, self.statics, self.flat, self.pool = {}, {}, {}, None  # the graphs' memory back
            warnings.warn(f"CUDA graph capture of a replayed layer failed ({self.failed}); replaying eagerly",
                          RuntimeWarning, stacklevel=4)
            return None
        entry = LayerGraph(graph, signature, views, present, need_x)
        self.layers[slot] = entry
        return entry
