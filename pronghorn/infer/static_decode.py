"""Static-shape decode steps: a :class:`StaticKVCache` plus device-side step inputs, optionally captured once
in a CUDA graph and replayed for every token.

A step reads the token ids from ``ids`` [B, 1] and positions from ``pos`` [B, 1], writes its keys/values at
the cache's device-side slot, and advances slot and positions in place: no host synchronisation, the same
shapes every step, so the whole forward (LoRA adapters unmerged included) is one graph launch. Sampling
runs outside the graph on the returned logits, so random draws are those of the eager path.

The prompt is filled a group of rows at a time (:data:`PREFILL_TOKENS` prompt tokens a forward, at least one
row): the cache is allocated for every row and the new tokens before the prompt runs, so one forward over all
rows' prompts would add its activations (the MLP's intermediate above all) on top of the whole cache.

The adapters' operands (``A`` and ``s * B`` in the compute dtype) are made once per generate call, in the
prefill, into the runner's :class:`~pronghorn.kernels.adapter_operands.GraphOperands` store, and made again in
place by the next call's prefill: the steps (and the graph) read them without casting each adapter again.

Rows that come in groups of one prompt (GRPO's completions; any batch of repeated prompts, found by
``models.shared_prefix_cache.shared_rows``) decode from a :class:`SharedPrefixCache`: the prompt's keys and values
are held and prefilled once a group.

A runner is kept per model (the latest only, dropped with the model) and reused while the batch size,
cache length and parameters (storage, adapters switched on or off) are unchanged.
"""

from __future__ import annotations

import warnings
import weakref

import torch
from torch import nn

from ..kernels.adapter_operands import GraphOperands, operands_kept
from ..models.allocator import note_graph
from ..models.kv_cache import StaticKVCache
from ..models.replay_graphs import module_signature
from ..models.shared_prefix_cache import SharedPrefixCache

CACHE_LEN_MULTIPLE = 128  # cache lengths are rounded up so graphs are reused across nearby prompt lengths
WARMUP_STEPS = 2
PREFILL_TOKENS = 1024  # prompt tokens per prefill forward (whole rows): its activations stay below a big batch's
# sampling step (GRPO's 64 rows of Llama-3.2-1B: 70 against 78 MiB), and 1,024-row matmuls run near full speed

_RUNNERS: "weakref.WeakKeyDictionary[nn.Module, DecodeRunner]" = weakref.WeakKeyDictionary()


def graphs_supported(model: nn.Module) -> bool:
    """CUDA graphs need a CUDA model and step shapes/values free of host decisions (dynamic NTK and LongRoPE
    read the largest position on the host every step, so they decode eagerly)."""
    rope = getattr(model.config, "rope", None) or {}
    return model.device.type == "cuda" and rope.get("rope_type") not in ("dynamic", "longrope")


def cache_length(tokens: int, multiple: int = CACHE_LEN_MULTIPLE) -> int:
    return -(-tokens // multiple) * multiple



class DecodeRunner:
    """Prefill then one-token decode steps on a static cache; ``use_graph`` captures the step (CUDA)."""

    def __init__(self, model: nn.Module, batch: int, max_len: int, use_graph: bool, share: int = 1,
                 prompt_len: int = 0):
        cfg, device = model.config, model.device
        shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, cfg.head_dim)
        if share > 1:  # groups of rows with one prompt: the prompt's keys and values held once a group
            self.cache = SharedPrefixCache(*shape[:2], share, *shape[2:], prompt_len, max_len, model.dtype, device)
        else:
            self.cache = StaticKVCache(*shape, max_len, model.dtype, device)
        self.share = share
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.use_graph = use_graph
        self.strict = False  # True: a failed capture raises instead of falling back to graph-less steps
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None  # the graph's output buffer
        self.operands = GraphOperands()  # the adapters' matmul operands, made once per generate call
        self.key = (batch, max_len, use_graph, module_signature(model), share, prompt_len if share > 1 else 0)

    def prefill(self, model: nn.Module, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                padded: bool) -> torch.Tensor:
        """Run the prompt (eagerly, a group of rows at a time) into the cache; return the last position's logits
        [B, V]."""
        self.cache.reset()
        self.operands.renew()  # the adapters may have trained since the last call: operands made again, in place
        batch, length = input_ids.shape
        g = self.share  # with a shared prompt, the prefill runs each group's prompt once
        group = max(1, PREFILL_TOKENS // max(length, 1))
        logits = []
        for r in range(0, batch // g, group):
            rows = slice(r * g, (r + group) * g, g)
            with operands_kept(self.operands):
                out = model(input_ids=input_ids[rows], attention_mask=mask[rows] if padded else None,
                            position_ids=positions[rows], past_key_values=self.cache.rows(r * g, (r + group) * g),
                            logits_to_keep=1)
            logits.append(out.logits[:, -1])
        self.cache.length = length
        self.cache.start_decoding(mask if padded else None)
        self.pos.copy_(positions[:, -1:] + 1)
        logits = logits[0] if len(logits) == 1 else torch.cat(logits)
        return logits.repeat_interleave(g, 0) if g > 1 else logits

    def step(self, model: nn.Module, next_ids: torch.Tensor) -> torch.Tensor:
        """Feed ``next_ids`` [B]; return the logits [B, V] of the next position (a buffer the next step
        overwrites when graphed: use it before stepping again)."""
        self.ids.copy_(next_ids[:, None])
        if not self.use_graph:
            return self._forward(model)
        if self.graph is None:
            try:
                self._capture(model)
            except Exception as e:  # noqa: BLE001 - anything the step does that a graph cannot hold
                if self.strict:
                    raise
                warnings.warn(f"CUDA graph capture of the decode step failed ({type(e).__name__}: {e}); "
                              "decoding without a graph", RuntimeWarning, stacklevel=3)
                self.use_graph = False  # the key keeps use_graph=True: later calls reuse this runner, no retry
                return self._forward(model)
        self.graph.replay()
        return self.logits

    def _forward(self, model: nn.Module) -> torch.Tensor:
        with operands_kept(self.operands):  # made in this call's prefill: a graph captures no cast of them
            out = model(input_ids=self.ids, position_ids=self.pos, past_key_values=self.cache, logits_to_keep=1)
        self.pos.add_(1)
        return out.logits[:, -1]

    def _capture(self, model: nn.Module) -> None:
        """Warm up on a side stream (lazy initialisations, kernel compilation), rewind the step state, capture.
        Warm-up writes only into slots the real steps overwrite."""
        index, pos = self.cache.index.clone(), self.pos.clone()
        stream = warmup_stream(self.ids.device)
        stream.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(stream):
                for _ in range(WARMUP_STEPS):
                    self._forward(model)
        finally:
            torch.cuda.current_stream().wait_stream(stream)
            self.cache.index.copy_(index)
            self.pos.copy_(pos)
        graph = torch.cuda.CUDAGraph()
        note_graph(graph)
        with torch.cuda.graph(graph, stream=stream):  # the warm-up's stream: one cuBLAS workspace for both
            self.logits = self._forward(model)
        self.graph = graph


_WARMUP_STREAMS: dict[torch.device, "torch.cuda.Stream"] = {}


def warmup_stream(device: torch.device) -> "torch.cuda.Stream":
    """One side stream per device for every capture and its warm-up. A new stream per capture would leave, for
    each, the cuBLAS workspace torch keeps per (handle, stream) allocated for good: GRPO captures a graph every
    generation, and on the H100 what stayed allocated grew by 32-96 MiB a step (session 15). Capturing on the
    warm-up's stream (not torch's own capture stream) holds one workspace for both, 32 MiB on Hopper."""
    if device not in _WARMUP_STREAMS:
        _WARMUP_STREAMS[device] = torch.cuda.Stream(device)
    return _WARMUP_STREAMS[device]


def get_runner(model: nn.Module, batch: int, tokens: int, use_graph: bool,
               multiple: int = CACHE_LEN_MULTIPLE, share: int = 1, prompt_len: int = 0) -> DecodeRunner:
    """The model's runner for ``batch`` rows of up to ``tokens`` tokens, its cache rounded up to ``multiple``
    (reused when it fits, else new); ``share`` > 1: the rows come in groups of that many with one prompt of
    ``prompt_len`` tokens (models/shared_prefix_cache.py)."""
    max_len = cache_length(tokens, multiple)
    runner = _RUNNERS.get(model)
    key = (batch, max_len, use_graph, module_signature(model), share, prompt_len if share > 1 else 0)
    if runner is not None and runner.key == key:
        return runner
    _RUNNERS.pop(model, None)  # free the old graph and cache before allocating new ones: the last reference to
    del runner  # the old runner goes too, or both caches would be alive while the new one is allocated
    runner = DecodeRunner(model, batch, max_len, use_graph, share, prompt_len)
    _RUNNERS[model] = runner
    return runner


def live_graphs() -> bool:
    """Whether a kept decode runner holds a captured graph (which bakes in a cuBLAS workspace: freeing the
    workspaces, ``allocator.release_workspaces``, is safe only while none does)."""
    return any(r.graph is not None for r in list(_RUNNERS.values()))


def release(model: nn.Module) -> None:
    """Drop the model's cached runner (its KV cache and graph memory), e.g. before training again."""
    _RUNNERS.pop(model, None)

