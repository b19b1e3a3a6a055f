"""The memory plan: how one training step of a batch shape fits a memory budget, decided once, outside the forward.

A budget is the most device memory the process may hold at the step's peak: ``max_memory`` (``get_peft_model``,
``TrainConfig``, ``--max-memory``; "16GiB", "24GB" or bytes), capped by ``torch.cuda.set_per_process_memory_fraction``
and by what the GPU has free. From the budget and the batch shape, :func:`make_plan` picks the fastest plan whose
estimated peak fits, trying in order of speed:

1. per layer: keep every activation, else recompute the fewest layers, else offload the inputs of the earliest
   layers to pinned host memory (models/recompute.py);
2. for a replayed layer: the whole layer at once, else its two residual blocks apart (split replay, a smaller
   peak for one more attention-block forward, or for an offloaded layer the MLP block's input parked on the host
   beside the layer's); an NF4 layer's dequantized weights kept from its replay for its
   backward, else dequantized again;
3. the untied input table in pinned host memory (nearly free: a lookup reads ``tokens x hidden`` values over PCIe);
4. the MLP over chunks of tokens (models/tiled_mlp.py), smaller logits chunks in the loss, and last a tied table
   on the host with the output head streamed from there.

When nothing fits, :func:`make_plan` raises before the step runs, naming the smallest budget that would fit. The
estimate (:class:`StepSizes`) counts the resident weights and adapters (measured), the optimizer state still to
come, the kept activations and the larger of the loss's and a replayed layer's backward transient.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace

import torch

from ..errors import PronghornError
from ..kernels.logits_chunks import CHUNK_BYTES
from ..kernels.softcapped_attention import kernel_runs as softcap_kernel_runs

GIB = 2**30
HEADROOM = 0.04  # of the budget, left to fragmentation and allocator rounding
# what the replay graphs' pool reserves beyond the bytes it holds at once (its segments' rounding and the forward
# and backward graphs' different block sizes): measured 0.16-0.18 GiB on the 1B and Gemma-3-4B rows (H100, session 18)
GRAPH_POOL_SLACK = 176 * 2**20
LOSS_CHUNK_BYTES = (CHUNK_BYTES, CHUNK_BYTES // 4, CHUNK_BYTES // 16)  # logits buffer of the loss, tried in order
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_budget(value) -> int | None:
    """Bytes for a budget setting: None / "none" / "auto" (no budget), a number of bytes, or a string such as
    "16GiB", "24 GB", "1.5gib"."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "auto")):
        return None
    if isinstance(value, bool):
        raise PronghornError(f"max_memory must be a size such as '16GiB' or a number of bytes, got {value!r}")
    if isinstance(value, (int, float)):
        number, unit = value, ""
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
        if not m or m.group(2).lower() not in _UNITS:
            raise PronghornError(f"max_memory must be a size such as '16GiB', '24GB' or a number of bytes, got {value!r}")
        number, unit = float(m.group(1)), m.group(2).lower()
    size = int(number * _UNITS[unit])
    if size <= 0:
        raise PronghornError(f"max_memory must be positive, got {value!r}")
    return size


@dataclass(frozen=True)
class OptimizerFootprint:
    """What the optimizer adds per trained element: ``state_bytes`` of state (None: AdamW's two moments, counted
    in fp32, the most torch's take), and whether gradients are applied and freed in the backward pass (train/step_in_backward.py:
    then only one layer's gradients, and the tables', exist at once). ``advice``: what the planner's "does not
    fit" error suggests besides a larger budget and fewer tokens (full fine-tuning: a leaner optimizer; empty: the
    LoRA advice, load_in_4bit)."""

    state_bytes: float | None = None
    grads_in_backward: bool = False
    advice: str = field(default="", compare=False)


@dataclass(frozen=True)
class StepSizes:
    """Byte sizes of one training step of a batch shape: the planner's inputs (pure numbers, testable)."""

    layers: int
    attn_block: int  # tensors one layer's attention block keeps for its backward (its input included)
    mlp_block: int  # ... its MLP block (the residual between the blocks included)
    tiled_block: int  # ... the MLP block when tiled: its input alone
    layer_input: int  # one layer input (what a recomputed layer keeps)
    backward_extra: int  # transients of both of a layer's blocks' backward beyond what they keep
    tiled_token: int  # bytes per token of a tiled-MLP chunk replayed and back-propagated (0: cannot be tiled)
    dense_layer: int  # one NF4 layer's dense weights (kept from replay to backward when reused; 0: not NF4)
    tokens: int  # labelled rows reaching the loss (at most batch x sequence)
    vocab: int
    head_itemsize: int
    loss_extra: int  # the final norm's input and output and the hidden-state gradient the loss forms
    resident: int  # bytes on the device now: weights, adapters, buffers
    to_come: int  # gradients and optimizer state of the trainable parameters not allocated yet
    untied_table: int  # input table bytes that can move to the host (0: tied or already there)
    tied_table: int  # a tied table (also the head) that can move to the host with a streamed head (0: none)
    operands: int = 0  # one layer's adapters in their compute dtype (kernels/adapter_operands.py), held from a
    # replayed layer's forward to its backward, or with ``step_operands`` by every eager layer for the whole step
    step_operands: bool = False  # the model keeps its operands across steps (kernels/step_operands.StepOperands)
    attention_extra: int = 0  # transients of the attention block's backward alone (its MLP block's are freed)
    layer_grads: int = 0  # bytes of one layer's parameter gradients still to come (part of ``to_come``): they appear
    # in the backward, layer by layer from the top (all kept to the step; with grads_in_backward one at a time)
    grads_in_backward: bool = False
    head_grad: int = 0  # elements of a trained output head (full fine-tuning, lm_head trained): the fused loss
    # accumulates its gradient in fp32 over the logits chunks, held until the loss's backward

    def loss(self, chunk_bytes: int, streamed: bool) -> int:
        """The loss's peak: one chunk of logits (rows split evenly, as the fused loss does) plus ``loss_extra``;
        a streamed head holds one vocabulary slice of the table and its logits instead."""
        if streamed:
            return self.loss_extra + 2 * (self.tokens * 4096 * self.head_itemsize)
        cap = max(1, chunk_bytes // (self.vocab * self.head_itemsize))
        chunks = max(1, math.ceil(self.tokens / cap))
        rows = math.ceil(self.tokens / chunks)
        accumulator = 4 * self.head_grad if chunks > 1 else 0  # one chunk: dW in the weight's dtype is the grad
        return self.loss_extra + rows * self.vocab * self.head_itemsize + accumulator


@dataclass(frozen=True)
class MemoryPlan:
    """One visible decision for a batch shape: what each layer keeps, how replays run, where tables live."""

    layers: tuple[str, ...]  # per layer: keep | recompute | offload
    split_replay: bool = False  # a replayed layer's two residual blocks replayed apart
    reuse_dequantized: bool = True  # an NF4 layer's replay keeps its dense weights for its backward
    mlp_chunk: int | None = None  # tokens per chunk of the tiled MLP; None: untiled
    loss_chunk_bytes: int = LOSS_CHUNK_BYTES[0]  # logits buffer of the fused loss
    table_on_host: str | None = None  # None | "untied" | "tied": the input table in pinned host memory
    park_offloaded: bool = False  # an offloaded layer parks its MLP block's input beside its own, replays split
    replay_graphs: bool = False  # replayed layers run as CUDA graphs (models/replay_graphs.py)
    kept_graphs: bool = False  # the kept layers (the top ones) run as CUDA graphs (models/kept_graphs.py)
    estimate_bytes: int = 0  # the estimated peak of the step
    budget_bytes: int | None = None
    budget_source: str = ""
    batch: tuple[int, int] = (0, 0)
    notes: tuple[str, ...] = field(default=(), compare=False)

    @property
    def replays(self) -> bool:
        return any(m != "keep" for m in self.layers)

    def splits(self, mode: str) -> bool:
        """Whether a layer of ``mode`` (recompute | offload) is replayed one residual block at a time: all with
        ``split_replay``; an offloaded one also from its parked MLP input (``park_offloaded``), which costs no
        extra forward (models/recompute.py)."""
        return self.split_replay or (mode == "offload" and self.park_offloaded)

    def summary(self) -> str:
        counts = ", ".join(f"{self.layers.count(m)} {m}" for m in ("keep", "recompute", "offload") if m in self.layers)
        parts = [f"{len(self.layers)} layers: {counts}"]
        parked = "offload" in self.layers and self.park_offloaded and not self.split_replay
        if "recompute" in self.layers or ("offload" in self.layers and not parked):
            parts.append("split replay" if self.split_replay else "whole-layer replay")
        if parked:
            parts.append("offloaded layers split, MLP input parked")
        if self.replay_graphs:
            parts.append("replays as CUDA graphs")
        if self.kept_graphs:
            parts.append("kept layers as CUDA graphs")
        if self.mlp_chunk:
            parts.append(f"tiled MLP ({self.mlp_chunk} tokens)")
        if self.loss_chunk_bytes != LOSS_CHUNK_BYTES[0]:
            parts.append(f"loss logits chunk {self.loss_chunk_bytes / 2**20:.0f} MiB")
        if self.table_on_host:
            parts.append(f"{self.table_on_host} input table on the host")
        budget = "no budget" if self.budget_bytes is None else f"budget {self.budget_bytes / GIB:.2f} GiB ({self.budget_source})"
        return f"{'; '.join(parts)}; estimated peak {self.estimate_bytes / GIB:.2f} GiB, {budget}"


def estimate_peak(s: StepSizes, plan: MemoryPlan) -> int:
    """The estimated peak bytes of a step run with ``plan``: resident + optimizer to come + the largest of its
    moments (:func:`step_moments`)."""
    resident = s.resident + s.to_come
    if plan.table_on_host == "untied":
        resident -= s.untied_table
    elif plan.table_on_host == "tied":
        resident -= s.tied_table
    return resident + max(step_moments(s, plan))


def step_moments(s: StepSizes, plan: MemoryPlan) -> list[int]:
    """Activation bytes at the step's candidate peaks (beyond resident and optimizer bytes): the loss, with every
    layer's stored tensors; then, layer by layer from the top, its backward: what the layers below it store, plus
    its own tensors (kept, or replayed) and backward transients. A layer's MLP block is back-propagated first and
    frees what it saved before the attention block's backward makes its own transients (``attention_extra``),
    so a layer's backward peaks at the larger of the two. An offloaded layer's moment also holds the input being
    prefetched for the layer below. Layer gradients exist from their layer's backward on (with the step in the
    backward, one layer's at a time). Checked against 50 peaks measured on H100/H200 (LoRA and QLoRA of five
    models, full fine-tuning; tests/models/test_memory_plan_calibration.py): every estimate within 0.97-1.05 of
    the peak."""
    tiled = plan.mlp_chunk is not None and s.tiled_token > 0 and plan.mlp_chunk < s.tokens
    mlp = s.tiled_block if tiled else s.mlp_block
    keep_layer = s.attn_block + mlp
    mlp_backward = s.backward_extra + (s.tiled_token * plan.mlp_chunk if tiled else 0)
    attn_backward = s.backward_extra + s.attention_extra

    graphs = plan.replay_graphs and plan.replays

    # the operands of the layers that run eagerly: with a step store, all of them for the whole step
    held = sum(s.operands for m in plan.layers if m == "keep" or not graphs) if s.step_operands else 0
    apart = 0 if s.step_operands else s.operands  # else each replayed layer holds its own

    def stored(m: str) -> int:  # a graphed replay makes its operands itself: the forward keeps none
        return keep_layer if m == "keep" else (0 if graphs else apart) + (s.layer_input if m == "recompute" else 0)

    def own(m: str) -> int:  # a layer's backward: its stored input or tensors, what it saves again, transients
        if m != "keep" and plan.splits(m):  # the MLP block from its input (the layer input held), then attention
            peak = max(s.layer_input + mlp + mlp_backward, s.attn_block + attn_backward)
        else:
            peak = s.attn_block + max(mlp + mlp_backward, attn_backward)
        if m != "keep":
            peak += (s.operands if graphs else apart) + (s.dense_layer if plan.reuse_dequantized else 0)
        return peak

    # graphs: one pool holds the largest replayed backward for the whole step, beside static buffers (the output
    # gradient, the input gradient and a parked MLP input; one layer's parameter gradients and their copy)
    replayed = [m for m in dict.fromkeys(plan.layers) if m != "keep"]
    parked = any(plan.splits(m) and m == "offload" for m in replayed)
    pool = (max(map(own, replayed)) + (2 + parked) * s.layer_input + 2 * s.layer_grads + GRAPH_POOL_SLACK
            if graphs else 0)

    def backward(m: str) -> int:
        prefetch = s.layer_input if m == "offload" else 0  # the input of the layer below, on its way back
        if graphs and m != "keep":
            return pool + prefetch
        return own(m) + pool + prefetch

    def pending(j: int) -> int:  # layer gradients counted in to_come that do not exist yet at layer j's backward
        return 0 if s.grads_in_backward else j * s.layer_grads

    # kept graphs: their pool holds the largest kept layer backward's transients for the whole step (beside the
    # loss's and the replayed layers' own), the first kept layer's input and two input gradients, one layer's
    # parameter gradients and their copy
    statics = 3 * s.layer_input + 2 * s.layer_grads + GRAPH_POOL_SLACK if plan.kept_graphs else 0
    kept_pool = statics + max(mlp_backward, attn_backward) if plan.kept_graphs else 0

    below = [0]
    for m in plan.layers:
        below.append(below[-1] + stored(m))
    n = len(plan.layers)
    # the top layers' inputs may still be on their way to the host when the loss runs (copies lag the forward)
    copying = 2 * s.layer_input if plan.layers and plan.layers[-1] == "offload" else 0
    loss = s.loss(plan.loss_chunk_bytes, streamed=plan.table_on_host == "tied")
    moments = [below[-1] + copying + loss + pool + kept_pool
               - (s.layer_grads if s.grads_in_backward else n * s.layer_grads)]
    # a kept layer's backward transients are its own (in the pool); a replayed layer's are beside the pool's
    moments += [below[j] + backward(m) + (statics if m == "keep" else kept_pool) - pending(j)
                for j, m in enumerate(plan.layers)]
    return [held + m for m in moments]


def candidate_plans(s: StepSizes, mode: str = "auto", tiled_mlp: str = "auto", mlp_chunk: int = 8192,
                    replay: str = "auto", host_tied_table: bool = True, graphs: bool = False,
                    kept_graphs: bool = False) -> list[MemoryPlan]:
    """Every plan within the user's settings, fastest first (:func:`relative_cost`): ``mode`` auto | off | on |
    offload (layers), ``tiled_mlp`` auto | on | off, ``replay`` auto | whole | split. ``host_tied_table=False``:
    no plan puts a tied table on the host (a model that decodes between its steps, as GRPO's, needs it on the
    device for every generated token: decoding would copy it back whole each forward). ``graphs``: plans that
    replay layers may run the replays as CUDA graphs (models/replay_graphs.py; not with a tiled MLP);
    ``kept_graphs``: a plan that keeps layers may run them as CUDA graphs (models/kept_graphs.py).

    Replayed layers below kept ones are recomputed, never offloaded: offloading them buys a kept layer or two at
    16-24 GiB, and measured that was within noise (-0.4% to +1.9% on five 8B rows, H100, session 25,
    docs/benchmarks.md), so those plans were dropped."""
    n = s.layers
    if mode == "off":
        layer_sets = [("keep",) * n]
    elif mode == "on":
        layer_sets = [("recompute",) * n]
    elif mode == "offload":
        layer_sets = [("offload",) * n]
    else:  # earliest layers first: their inputs are needed last in the backward
        layer_sets = [("recompute",) * k + ("keep",) * (n - k) for k in range(n + 1)]
        layer_sets += [("offload",) * k + ("recompute",) * (n - k) for k in range(1, n + 1)]
    # auto: the configured chunk, and smaller ones down to 1,024 tokens for short batches and tight budgets
    smaller = [c for c in (mlp_chunk // 2, mlp_chunk // 4, mlp_chunk // 8) if 1024 <= c < s.tokens]
    smaller = ([mlp_chunk] if mlp_chunk < s.tokens else []) + smaller
    on = [mlp_chunk if mlp_chunk < s.tokens else None]
    tilings = {"off": [None], "on": on, "auto": [None, *dict.fromkeys(smaller)]}[tiled_mlp]
    if s.tiled_token == 0:
        tilings = [None]
    replays = {"whole": [False], "split": [True], "auto": [False, True]}[replay]
    tables = [None] + (["untied"] if s.untied_table else []) + (["tied"] if s.tied_table and host_tied_table else [])
    # an offloaded layer replayed split parks its MLP input (no extra forward); without split_replay it may too
    parks = {"whole": [False], "split": [True], "auto": [False, True]}[replay]
    def graph_kinds(layers: tuple, chunk) -> tuple:  # (replay_graphs, kept_graphs) pairs to try, graphed first
        if chunk is not None:
            return ((False, False),)
        replayed = (True, False) if graphs and layers.count("keep") < n else (False,)
        kept = (True, False) if kept_graphs and "keep" in layers else (False,)
        return tuple((r, k) for r in replayed for k in kept)

    plans = [MemoryPlan(layers, split, reuse, chunk, loss_chunk, table, park_offloaded=park, replay_graphs=graphed,
                        kept_graphs=kept)
             for layers in layer_sets
             for split in (replays if "recompute" in layers else [False])
             for park in (parks if "offload" in layers and not split else [split])
             for reuse in ((True, False) if s.dense_layer else (True,))
             for chunk in tilings for loss_chunk in LOSS_CHUNK_BYTES for table in tables
             for graphed, kept in graph_kinds(layers, chunk)]
    return sorted(plans, key=lambda plan: relative_cost(plan, s.tokens))


def relative_cost(plan: MemoryPlan, tokens: int = 0) -> float:
    """The step time of ``plan`` relative to keeping everything, in layer-steps (rough, for ordering only): a
    replayed layer redoes its forward less down_proj's matmul; offloading adds an overlapped copy; a split
    replay adds an attention-block forward (an offloaded layer's, a copy of the MLP block's input); NF4 weights dequantized twice; a tiled kept layer its MLP forward;
    smaller loss chunks, and a tied table streamed from the host, a slower head.

    Calibrated on an H200 (2026-12-05, docs/benchmarks.md "Session 9"): a recomputed layer cost 0.37-0.42 of a
    kept layer's step (8B LoRA, 8B QLoRA), an offloaded one 0.30-0.44 (1B, 8B QLoRA, 8B LoRA); the tiled MLP at
    1,024-token chunks of a 4,096-token batch added about 1.5 per layer (8B LoRA, 30 layers offloaded).
    Replays as CUDA graphs are counted 5% cheaper: enough to take them where the same layers are replayed either
    way (a tight budget, where a small model's step is bound by launches), not to give up a kept layer for them
    (a large model's replay is bound by its matmuls, which a graph does not speed up). Graphed, parking an
    offloaded layer's MLP input makes its replay 0.01 cheaper than a whole one (it skips o_proj's matmul; eagerly
    it costs host time): 1B LoRA at Unsloth's 3.66 GiB then replays every layer as graphs, parked, at 1.26x the
    eager plan (H100, session 21), and at Unsloth's peaks the 8B rows (LoRA and QLoRA) ran parked at 1.03x the
    graphed whole replays of "16 recompute, 16 offload" and "12 recompute, 20 offload" (H100, session 22). At
    0.01 a kept layer is still worth more than parking every replayed one. Kept layers as CUDA graphs only break
    ties: the plan takes them where their pool fits beside the same layers, chunks and table (unmeasured: what
    they save depends on the host). ``tokens``: the batch's (0: unknown, counted as
    8,192)."""
    cost = 0.0
    graphed = 0.95 if plan.replay_graphs else 1.0
    for m in plan.layers:
        replayed = m != "keep"
        cost += {"keep": 0.0, "recompute": 0.38, "offload": 0.39}[m] * graphed
        # a split replay: a recomputed layer's attention block once more; an offloaded one parks the MLP block's
        # input on the host instead (one more overlapped copy each way, and more host time eagerly; graphed, no
        # host time, and its replay skips the o_proj matmul: 0.97x a whole replay's step on both 8B rows)
        parking = -0.01 if plan.replay_graphs else 0.01
        split = {"keep": 0.0, "recompute": 0.07, "offload": parking}[m] if replayed and plan.splits(m) else 0.0
        cost += split + 0.04 * (replayed and not plan.reuse_dequantized)
        if plan.mlp_chunk:  # per chunk: the MLP's matmuls on fewer rows, its replay and backward one at a time
            chunks = math.ceil((tokens or 8192) / plan.mlp_chunk)
            cost += (0.2 if replayed else 0.35) + 0.33 * chunks
    cost -= 0.005 * plan.kept_graphs  # a tie-break: never for a kept layer, a loss chunk or the table
    cost += {LOSS_CHUNK_BYTES[0]: 0.0, LOSS_CHUNK_BYTES[1]: 0.01, LOSS_CHUNK_BYTES[2]: 0.05}[plan.loss_chunk_bytes]
    cost += {None: 0.0, "untied": 0.001, "tied": 3.0}[plan.table_on_host]
    return cost


def make_plan(s: StepSizes, budget: int | None, budget_source: str = "", batch: tuple[int, int] = (0, 0),
              advice: str = "", target: float = 1.0, **settings) -> MemoryPlan:
    """The first (fastest) candidate whose estimated peak fits ``budget`` less :data:`HEADROOM`; without a budget,
    the fastest. ``target`` < 1 aims lower, at that fraction of the usable budget, taking the leanest plan when
    none fits the aim but it fits the budget (after a step that ran out of memory although its plan's estimate
    fit). Raises a PronghornError naming the smallest budget that would fit when none does, and ``advice``
    (:class:`OptimizerFootprint`'s; empty: load_in_4bit)."""
    usable = None if budget is None else budget * (1 - HEADROOM)
    aim = None if usable is None else usable * target
    leanest = None
    for plan in candidate_plans(s, **settings):
        need = estimate_peak(s, plan)
        if aim is None or need <= aim:
            return replace(plan, estimate_bytes=need, budget_bytes=budget, budget_source=budget_source, batch=batch)
        if leanest is None or need < leanest[0]:
            leanest = (need, plan)
    need, plan = leanest
    if need <= usable:  # nothing fits the lowered aim: the leanest plan, which the budget holds
        return replace(plan, estimate_bytes=need, budget_bytes=budget, budget_source=budget_source, batch=batch)
    smallest = need / (1 - HEADROOM)
    raise PronghornError(
        f"a training step of batch {batch[0]} x {batch[1]} tokens does not fit the memory budget of "
        f"{budget / GIB:.2f} GiB ({budget_source}): the leanest plan ({replace(plan, estimate_bytes=need).summary()}) "
        f"needs about {smallest / GIB:.2f} GiB. Raise max_memory to at least {math.ceil(smallest / GIB * 10) / 10:g}GiB, "
        f"or train on fewer tokens per step (batch size, max_seq_length), or {advice or 'load_in_4bit=True'}")


# --- from a model and a device: the sizes and the budget ---

def free_memory(device: torch.device) -> int | None:
    """Bytes new tensors can take on ``device``: the driver's free memory plus what PyTorch's allocator holds
    unused, within the process's memory fraction cap if one is set; host RAM available for a CPU; None when
    unknown."""
    if device.type == "cuda":
        budget, _ = device_budget(device, None)
        return budget - torch.cuda.memory_allocated(_indexed(device))
    if device.type == "cpu":
        return _host_available()
    return None


def device_budget(device: torch.device, max_memory: int | None) -> tuple[int | None, str]:
    """(the most bytes the process may hold allocated on ``device`` at a step's peak, what sets it): the smallest
    of ``max_memory``, the process's memory fraction cap and what the GPU can still give (its free memory plus
    what PyTorch holds); on a CPU ``max_memory``, else the available RAM plus what the model holds (None: unknown)."""
    limits = [] if max_memory is None else [(max_memory, f"max_memory={max_memory / GIB:.2f}GiB")]
    if device.type == "cuda":
        device = _indexed(device)
        free, total = torch.cuda.mem_get_info(device)
        limits.append((free + torch.cuda.memory_reserved(device), "the GPU's free memory"))
        fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda d: 1.0)(device)
        if fraction < 1.0:
            limits.append((int(fraction * total), f"set_per_process_memory_fraction({fraction:g})"))
    if not limits:
        return None, ""
    return min(limits, key=lambda item: item[0])


def _indexed(device: torch.device) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)


def _host_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def tiled_mlp_chunk_bytes(chunk: int, hidden: int, intermediate: int, act_bytes: int) -> int:
    """Peak bytes of one chunk's recomputation and backward in the tiled MLP: gate, up, their product and the
    three gradients (6 x intermediate), the chunk's norm output, MLP output and two gradients (4 x hidden)."""
    return chunk * act_bytes * (6 * intermediate + 4 * hidden)


def step_sizes(decoder, batch: int, seq_len: int, dtype: torch.dtype, device: torch.device,
               head=None, first_step: bool = True, optimizer: OptimizerFootprint = OptimizerFootprint()) -> StepSizes:
    """:class:`StepSizes` of a DecoderModel (``decoder``) on ``batch`` x ``seq_len`` tokens of activation ``dtype``.
    ``head``: the causal LM's output head when its tables may move to the host (None: they stay). ``first_step``:
    the optimizer state is not allocated yet (``optimizer``'s state per trainable element is counted to come)."""
    from ..kernels.nf4 import NF4Weight

    cfg, tokens, e = decoder.cfg, batch * seq_len, torch.empty((), dtype=dtype).element_size()
    hidden, inter = cfg.hidden_size, cfg.intermediate_size
    q_dim, kv_dim = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    layer = decoder.layers[0]

    def adapters(scope) -> tuple[list, int]:
        """The adapted projections of ``scope`` and the byte size of their compute dtype."""
        adapted = [m for m in scope.modules() if getattr(m, "has_lora", False)]
        if not adapted:
            return [], 0
        probe = torch.empty(0, dtype=dtype, device=device)
        cdt = adapted[0].kernel_policy.compute_dtype(probe, adapted[0].weight) or adapted[0].lora_A.dtype
        return adapted, torch.empty((), dtype=cdt).element_size()

    def lora_bytes(scope) -> int:  # per token: the saved x A^T
        adapted, size = adapters(scope)
        return sum(m.lora_A.shape[0] for m in adapted) * size

    def operand_bytes(scope) -> int:  # A and s B in the compute dtype
        adapted, size = adapters(scope)
        return sum(m.lora_A.numel() + m.lora_B.numel() for m in adapted) * size

    nf4 = [m.weight for m in layer.modules() if isinstance(getattr(m, "weight", None), NF4Weight)]
    dense = [w.shape[0] * w.shape[1] * e for w in nf4]
    params = {id(p): p for p in decoder.parameters()}
    if head is not None:
        params.update({id(p): p for p in head.parameters()})
    trainable = [p for p in params.values() if p.requires_grad]
    to_come = _gradient_bytes(decoder, trainable, optimizer) + (_state_bytes(trainable, optimizer) if first_step else 0)
    store = getattr(decoder, "step_operands", None)
    if device.type == "cuda":  # the step store's operands are counted in the moments, not as resident
        resident = torch.cuda.memory_allocated(_indexed(device)) - (store.nbytes() if store is not None else 0)
    else:
        resident = sum(t.numel() * t.element_size() for t in [*params.values(), *decoder.buffers()] if t.device == device)
    table = decoder.embed_tokens.weight
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()  # DDP/FSDP own the layout
    movable = head is not None and table.device.type == "cuda" and not table.requires_grad and not distributed
    tied = head is not None and head.weight is table
    table_bytes = table.numel() * table.element_size()
    parts = cfg.parts
    sandwich = tokens * e * hidden if parts.sandwich_norms else 0  # each block's post-norm keeps its input
    # soft-capped attention's reference keeps its [batch, heads, seq, seq] scores (two in e, fp32 probs); the fused
    # kernel keeps only q, k, v, its output and the row statistics, as SDPA (counted in attn_block)
    reference = parts.attn_softcap and not softcap_kernel_runs(cfg.head_dim, device, layer.self_attn.kernel_policy)
    scores = batch * cfg.num_attention_heads * seq_len * seq_len * (2 * e + 4) if reference else 0
    qk_norms = tokens * e * (q_dim + kv_dim) if cfg.qk_norm else 0  # q/k norms (Qwen3, Gemma 3) keep q and k
    return StepSizes(
        layers=len(decoder.layers),
        attn_block=tokens * (e * (2 * hidden + 3 * q_dim + 2 * kv_dim) + lora_bytes(layer.self_attn)) + sandwich
        + scores + qk_norms,
        mlp_block=tokens * (e * (2 * hidden + 3 * inter) + lora_bytes(layer.mlp)) + sandwich,
        tiled_block=tokens * e * hidden,
        layer_input=tokens * e * hidden,
        # the output gradient, the residual's and an input gradient (3 x hidden); one dense weight
        backward_extra=tokens * e * 3 * hidden + max(dense, default=0),
        tiled_token=tiled_mlp_chunk_bytes(1, hidden, inter, e),
        dense_layer=sum(dense), tokens=tokens, vocab=cfg.vocab_size, head_itemsize=e,
        loss_extra=3 * tokens * hidden * e,  # the final norm's input and output, the hidden-state gradient
        resident=resident, to_come=to_come,
        untied_table=table_bytes if movable and not tied else 0,
        tied_table=table_bytes if movable and tied else 0,
        operands=operand_bytes(layer), step_operands=store is not None,
        # o_proj's input gradient and SDPA's dq, dk, dv with their contiguous copies for the q/k/v backward
        attention_extra=tokens * e * (3 * q_dim + 4 * kv_dim),
        head_grad=head.weight.numel() if head is not None and head.weight.requires_grad else 0,
        layer_grads=sum(p.numel() * p.element_size() for p in layer.parameters() if p.requires_grad and p.grad is None),
        grads_in_backward=optimizer.grads_in_backward,
    )


def _gradient_bytes(decoder, trainable: list, optimizer: OptimizerFootprint) -> int:
    """Gradients still to be allocated at the step's peak: every trained parameter's, or with the step in the
    backward the largest layer's plus those outside the layers (the tables and the final norm, whose gradients
    are completed last or early in the backward pass)."""
    def size(ps) -> int:
        return sum(p.numel() * p.element_size() for p in ps if p.requires_grad and p.grad is None)

    if not optimizer.grads_in_backward:
        return size(trainable)
    in_layers = {id(p) for p in decoder.layers.parameters()}
    largest = max((size(layer.parameters()) for layer in decoder.layers), default=0)
    return largest + size(p for p in trainable if id(p) not in in_layers)


def _state_bytes(trainable: list, optimizer: OptimizerFootprint) -> int:
    if optimizer.state_bytes is None:
        return sum(2 * p.numel() * max(p.element_size(), 4) for p in trainable)  # AdamW moments (fp32 at least)
    return int(sum(p.numel() * optimizer.state_bytes for p in trainable))
