"""CUDA graphs of kept layers: each layer's forward and its backward launched as one graph apiece.

A step with ample memory keeps every layer's activations and launches each layer's kernels from Python: 26 in a
bf16 LoRA layer's forward and about 40 in its backward (benchmarks/launch_census.py). On a slow host that is the
limit, not the GPU: on one H100 host (session 18) Gemma-3-4B ran faster with every layer *replayed* as CUDA graphs
(16,728 tok/s) than with every layer kept eagerly (14,323-15,562), although the replays redo the forward.

How it runs (:class:`KeptGraphs`, one per model, used when the memory plan says ``kept_graphs``: every layer kept,
no tiled MLP), in the manner of ``torch.cuda.make_graphed_callables``:

- A batch shape's first step runs eagerly (kernels compiled and tuned); when the next step has the same shape,
  its forward captures each layer's forward as a graph (recording what the layer's backward reads, in the
  graphs' pool), and its backward captures each layer's backward in reverse. Later steps of that shape replay
  them: all forwards in layer order, then all backwards in reverse, the order of capture, which is what lets one
  pool serve them all (a backward's transients reuse what the layers above saved).
- The graphs are chained: a layer's forward reads the previous layer's output where its graph left it, and the
  input gradients pass through two buffers in turn, so nothing is copied between layers. Before the first
  layer the batch's input is copied in; each layer's parameter gradients are cloned out of one flat buffer per
  dtype (one kernel), and the step's RoPE tables and masks are copied into static buffers once a step.
- A second forward before the backward of the first (two forwards, one backward) would overwrite the saved
  tensors of the first: it runs eagerly instead, as does any step while a capture is unfinished, a shape that
  changes from step to step, and a model whose tensors moved more than :data:`MAX_CAPTURES` times.

Exactness: a graph runs the eager layer's kernels on the same values, so losses and gradients are the eager ones
bit for bit (tests/models/test_kept_graphs.py; on an H100, fp32, bf16 and under autocast). Used where nothing
draws random numbers and not under torch.distributed (:func:`~pronghorn.models.replay_graphs.graphs_possible`);
on by default; ``gradient_checkpointing_enable(kept_graphs="off")`` (``DecoderModel.kept_graphs_setting``)
turns them off, ``replay_graphs="off"`` turns off these and the replays' graphs.

Measured (H100, session 19, a host whose launches were the limit): Gemma-3-4B LoRA 2 x 2048 with no cap ran
21,397 tok/s against 15,018 eagerly (1.42x), Llama-3.2-1B LoRA 4 x 2048 75,260 against 54,938 (1.37x), for
0.40-0.45 GiB more at the peak.

A plan that replays its bottom layers and keeps the top ones runs the kept ones as these graphs and the replays
as theirs (models/replay_graphs.py).

Memory: the pool holds every kept layer's saved tensors (as the eager step does) and, for the whole step, the
largest kept layer backward's transients beside three activation-sized buffers; the memory plan counts them
(``MemoryPlan.kept_graphs``) and takes the graphs where they fit beside the same kept layers. A new plan, or one
without them, gives their pool back first.
"""

from __future__ import annotations

import warnings
import weakref
from types import SimpleNamespace

import torch
from torch import nn

from ..kernels.adapter_operands import operands_kept
from .replay_graphs import CudaGraph, EagerGraph, GraphSet, LayerGraph, StaticArgs, layer_state, own_leaves

MAX_CAPTURES = 3  # per batch shape: the first capture and two after the model's tensors moved


class _Shape:
    """The graphs of one batch shape: per layer its forward and backward graphs and what they read and write."""

    def __init__(self, signature, statics: StaticArgs, x0: torch.Tensor, need_x: bool):
        self.signature, self.statics, self.need_x = signature, statics, need_x
        self.x0 = x0  # the first layer's input
        self.grads = (torch.empty_like(x0), torch.empty_like(x0))  # input gradients, layer by layer in turn
        self.layers: list[SimpleNamespace] = []
        self.stale = False  # a layer's tensors moved since the capture: captured again at the next step

    @property
    def complete(self) -> bool:
        return bool(self.layers) and all(held.backward is not None for held in self.layers)


class KeptGraphs(GraphSet):
    """A model's kept-layer graphs: :meth:`run` sends the batch through every layer as graphs (None: run them
    eagerly this step)."""

    def __init__(self, graph_type=CudaGraph):
        super().__init__(graph_type)
        self.shapes: dict = {}  # shape key -> _Shape (one at a time)
        self.capture_counts: dict = {}
        self.last_key = None
        self.in_flight = None  # [weak reference to the first layer's node, its backward done] of the last forward

    def run(self, layers: nn.ModuleList, x: torch.Tensor, args: tuple) -> torch.Tensor | None:
        """``x`` through ``layers`` (each called as ``layer(x, *args)``) as graphs; None: eagerly this time."""
        if self.failed is not None:
            self.release()
            return None
        if self._busy():
            return None
        leaves, spec, arg_key = self._flatten(args)
        if arg_key is None:
            return None
        device = x.device.type
        autocast = (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        key = (tuple(x.shape), x.dtype, x.device, x.requires_grad, arg_key, autocast)
        repeated, self.last_key = self.last_key == key, key
        shape = self.shapes.get(key)
        # every layer's state before any graph runs: to capture, or after a layer moved (or layers came or went)
        if shape is None or not shape.complete or shape.stale or len(shape.signature) != len(layers):
            states = [layer_state(layer) for layer in layers]  # (trainable parameters, signature) per layer
            if not all(state[0] for state in states):
                return None
            signature = tuple(state[1] for state in states)
            if shape is None or not shape.complete or shape.signature != signature:
                if not repeated or self.capture_counts.get(key, 0) >= MAX_CAPTURES:
                    return None  # a first sighting (the warm-up) or a shape that changes from step to step
                shape = self._new_shape(key, signature, x, leaves, spec)
            shape.stale = False
        shape.statics.load_args(args, leaves)
        if x.data_ptr() != shape.x0.data_ptr():
            shape.x0.copy_(x)
        for i, layer in enumerate(layers):
            # A replay checks each layer as its turn comes, while the GPU runs the graphs below it: checked all at
            # once first, the walk held the first graph back (H100, session 27: 1.4 ms of a 104 ms 1B step idle).
            params, signature = layer_state(layer)
            if i < len(shape.layers) and (signature != shape.signature[i] or not params):
                shape.stale = True  # moved since the capture: from here on eagerly, all captured again next step
                for later in layers[i:]:
                    x = later(x, *args)
                break
            x = _GraphedLayer.apply(self, shape, i, layer, autocast, x, *params)
            if i == 0:
                self.in_flight = [weakref.ref(x.grad_fn), False]
        return x.clone()  # the last output leaves the graphs' memory: a caller may keep it

    def release(self) -> None:
        """Drop every graph and buffer: their pool goes back to the device (once a step still in flight, which
        holds them, is gone)."""
        if not self.shapes:  # (called at every step whose plan has no kept graphs)
            return
        self.shapes, self.flat, self.pool, self.in_flight = {}, {}, None, None
        if self.graph_type is CudaGraph:
            torch.cuda.empty_cache()  # a pool with no graph left is freed here, not when its graphs are

    def forward_layer(self, shape: _Shape, i: int, layer: nn.Module, autocast, params: list) -> torch.Tensor:
        """Layer ``i``'s output, from its forward graph (captured now when it has none)."""
        if i < len(shape.layers):
            held = shape.layers[i]
            held.forward.replay()
            return held.out
        held = SimpleNamespace(forward=None, backward=None, out=None, inp=None, leaves=None, grads=None,
                               need_x=shape.need_x or i > 0)
        source = (lambda: shape.x0) if i == 0 else (lambda: shape.layers[i - 1].out)
        device = shape.x0.device.type

        def body() -> None:
            inp = source().detach().requires_grad_(held.need_x)
            with torch.enable_grad(), own_leaves(layer, params) as own, operands_kept({}), \
                    torch.autocast(device, autocast[1], enabled=autocast[0], cache_enabled=False):
                out = layer(inp, *shape.statics.args)
            held.inp, held.out, held.leaves = inp, out, own

        held.forward, _ = self._captured(body)
        shape.layers.append(held)
        return held.out

    def backward_layer(self, shape: _Shape, i: int, grad: torch.Tensor) -> list:
        """([input gradient or None], *parameter gradients) of layer ``i``, from its backward graph (captured now
        when it has none)."""
        held = shape.layers[i]
        grad_in, grad_out = shape.grads[(i + 1) % 2], shape.grads[i % 2]
        if grad.data_ptr() != grad_in.data_ptr():
            grad_in.copy_(grad)
        if held.backward is None:
            views = self._views(held.leaves)

            def body() -> list[bool]:
                inputs = ([held.inp] if held.need_x else []) + held.leaves
                grads = list(torch.autograd.grad(held.out, inputs, grad_in, allow_unused=True))
                if held.need_x:
                    grad_out.copy_(grads.pop(0))
                for g, view in zip(grads, views):
                    if g is not None:
                        view.copy_(g)
                return [g is not None for g in grads]

            held.backward, present = self._captured(body)
            held.grads = LayerGraph(None, None, views, present, False)
        else:
            held.backward.replay()
        grads = self._outputs(held.grads, None)
        if i == 0:
            if self.in_flight is not None:
                self.in_flight[1] = True
            # the first layer's input gradient leaves the graphs' memory (an input table's, or a user's leaf's)
            return [grad_out.clone() if held.need_x else None] + grads
        return [grad_out.detach()] + grads

    # --- internals ---

    def _busy(self) -> bool:
        """Whether the last forward run as graphs still waits for its backward (its saved tensors are in use)."""
        if self.in_flight is None:
            return False
        node, done = self.in_flight
        if done or node() is None:
            self.in_flight = None
            return False
        return True

    def _new_shape(self, key, signature, x, leaves, spec) -> _Shape:
        self.capture_counts[key] = self.capture_counts.get(key, 0) + 1
        self.release()  # one shape's graphs at a time
        if self.graph_type is CudaGraph:
            torch.cuda.empty_cache()  # the eager steps' cached blocks back before the pool takes its own
            self.pool = torch.cuda.graph_pool_handle()
        shape = _Shape(signature, StaticArgs(leaves, spec), torch.empty_like(x), x.requires_grad)
        self.shapes[key] = shape
        return shape

    def _captured(self, body):
        """(graph, ``body``'s result) with the graph run once. A failed capture turns graphs off for later steps
        and runs ``body`` eagerly, as does its graph for the rest of this step."""
        graph = self.graph_type()
        try:
            result = graph.capture(body, self.pool)
        except Exception as e:  # noqa: BLE001 - anything a layer does that a graph cannot hold
            self.failed = f"{type(e).__name__}: {e}"
            warnings.warn(f"CUDA graph capture of a kept layer failed ({self.failed}); running eagerly",
                          RuntimeWarning, stacklevel=5)
            graph = EagerGraph()
            result = graph.capture(body, None)
        if not graph.runs_at_capture:
            graph.replay()
        return graph, result


class _GraphedLayer(torch.autograd.Function):
    """One kept layer run by its graphs; its trainable parameters are inputs, so their gradients flow."""

    @staticmethod
    def forward(ctx, graphs: KeptGraphs, shape: _Shape, i: int, layer, autocast, x, *params):
        ctx.graphs, ctx.shape, ctx.i = graphs, shape, i
        # an alias of the graph's output: the next layer's graph reads it where it is
        return graphs.forward_layer(shape, i, layer, autocast, list(params)).detach()

    @staticmethod
    def backward(ctx, grad):
        gx, *grads = ctx.graphs.backward_layer(ctx.shape, ctx.i, grad)
        return (None, None, None, None, None, gx, *grads)
