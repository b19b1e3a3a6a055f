"""GRPO's generation and training under the memory budget: how many completions to decode at once, and a leaner
training plan when a training forward runs out of memory all the same.

Generation and training share one budget (``max_memory``, the process's memory fraction, the GPU's free memory:
:func:`~pronghorn.models.memory_plan.device_budget`). Training plans its step with the training step's plan;
the decoder's KV cache is released before it (``static_decode.release``). Decoding holds, besides what is
resident (weights, adapters, and the optimizer's state unless the trainer parks it on the host), per row the KV
cache of every layer for the prompt plus the new tokens (on a GPU the static cache's length, rounded up as
``infer.static_decode`` allocates it); and on top of the whole cache, at different times, either the activations
of one prefill forward (a group of rows' prompts, ``PREFILL_TOKENS`` tokens) or one sampling step's logits and
their fp32 working copies, per row. The rollout decodes at most :func:`generation_rows` rows at a time; more rows
than that are decoded in several rounds.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import PronghornError
from ..infer.static_decode import PREFILL_TOKENS, cache_length
from ..models.allocator import expand_segments_under_budget
from ..models.memory_plan import GIB, HEADROOM, device_budget, parse_budget
from .grpo_rollout import CACHE_MULTIPLE

CUBLAS_WORKSPACE = 32 * 2**20  # torch's cuBLAS workspace per (handle, stream) on Hopper (":4096:8")
GENERATION_WORKSPACES = 2  # the prefill's (the current stream) and the decode graph's warm-up and capture stream's
# (1 when the trainer decodes on the decode graph's stream alone: grpo_rollout.decoding_stream)


def _itemsize(model: nn.Module) -> int:
    """Bytes per element of the decoder's cache and activations: the model's compute dtype."""
    return torch.finfo(getattr(model, "dtype", torch.float32)).bits // 8


def kv_bytes_per_row(model: nn.Module, tokens: int, share: int = 1, prompt_len: int = 0) -> int:
    """The KV cache of one row of ``tokens`` (prompt + new) in every layer. ``share`` > 1: rows in groups of that
    many with one prompt of ``prompt_len`` tokens (models/shared_prefix_cache.py): the row's new tokens, its share
    of the group's prompt, and its part of the one layer's keys and values that attention reads."""
    c = model.config
    per_token = 2 * c.num_key_value_heads * c.head_dim * _itemsize(model)  # one layer's K and V
    if share <= 1:
        return c.num_hidden_layers * per_token * tokens
    return c.num_hidden_layers * per_token * (tokens - prompt_len) + math.ceil(
        c.num_hidden_layers * per_token * prompt_len / share) + per_token * tokens


def sampling_copies(top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0) -> float:
    """fp32 [rows, vocab] tensors alive at once in one sampling step (infer/sampling.py), in units of 4 bytes an
    element: 2 for a draw (the probabilities and the exponential draws divided in place; the scores are freed
    first) or a greedy pick; top-p's sort holds the scores, the sorted scores, their int64 indices and the sorted
    softmax with its cumulative sum (6); min-p the scores, probabilities, a bool mask and the filtered scores
    (3.25); top-k a bool mask beside the scores and the filtered ones (2.25); the repetition penalty the scores,
    their padded copy and the scattered result (3)."""
    return max(2.0, 2.25 if top_k > 0 else 0, 6.0 if top_p < 1.0 else 0, 3.25 if min_p > 0.0 else 0,
               3.0 if repetition_penalty != 1.0 else 0)


def sampling_bytes_per_row(model: nn.Module, copies: float = 2.0) -> int:
    """One decode step's logits of one row in the compute dtype (the decode graph's output) and ``copies`` fp32
    working copies of them while sampling (:func:`sampling_copies`)."""
    return int(model.config.vocab_size * (_itemsize(model) + 4 * copies))


def prefill_bytes(model: nn.Module) -> int:
    """Activations of one prefill forward of ``PREFILL_TOKENS`` prompt tokens: a layer's input, its norm, q, k, v
    and attention output, and the MLP's gate, up and product (the one layer at work; the cache is counted apart)."""
    c = model.config
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    return PREFILL_TOKENS * _itemsize(model) * (3 * c.hidden_size + 2 * q + 2 * kv + 3 * c.intermediate_size)


def generation_rows(rows: int, per_row: int, budget: int | None, resident: int, source: str = "max_memory",
                    transient_row: int = 0, transient: int = 0) -> int:
    """How many of ``rows`` to decode at once so that ``resident + n * per_row + max(transient, n *
    transient_row)`` fits ``budget`` with the memory plan's headroom (all of them without a budget): ``per_row``
    what each row holds for the whole round (its KV cache), ``transient`` what the prefill holds once and
    ``transient_row`` what a sampling step holds per row, never at the same time. None fits: a PronghornError
    naming the smallest budget."""
    if budget is None:
        return rows
    usable = budget * (1 - HEADROOM) - resident
    fits = int(min((usable - transient) // per_row, usable // (per_row + transient_row))) if usable > 0 else 0
    if fits < 1:
        need = (resident + per_row + max(transient, transient_row)) / (1 - HEADROOM)
        raise PronghornError(f"GRPO generation does not fit {source} ({budget / GIB:.2f} GiB): one completion's KV "
                             f"cache and logits take {(per_row + transient_row) / GIB:.3f} GiB beside "
                             f"{resident / GIB:.2f} GiB resident; the smallest budget that fits is "
                             f"{math.ceil(need / GIB * 100) / 100:.2f} GiB (or lower max_completion_length)")
    return min(rows, fits)


def head_copy_bytes(model: nn.Module) -> int:
    """A decode forward's transient device copy of an output head kept on the host (a tied table moved there with
    ``offload_embedding="tied"``: the logits read it whole each forward); 0 when the head is on the device."""
    weight = model.lm_head.weight
    return weight.numel() * weight.element_size() if weight.device != model.device else 0


def operand_bytes(model: nn.Module) -> int:
    """The adapters' operands the decode runner keeps for a generate call (``A`` and ``s * B`` in the compute
    dtype, kernels/adapter_operands.GraphOperands): on a GPU, whose fast LoRA ops make them; 0 elsewhere."""
    if getattr(model, "device", torch.device("cpu")).type != "cuda":
        return 0
    adapted = [m for m in model.modules() if getattr(m, "has_lora", False)]
    return sum(m.lora_A.numel() + m.lora_B.numel() for m in adapted) * _itemsize(model)


def _terms(model: nn.Module, max_memory: str | None, tokens: int, copies: float, share: int = 1,
           prompt_len: int = 0, workspaces: int = GENERATION_WORKSPACES) -> tuple:
    """(budget, source, resident, per_row, transient_row, transient) of :func:`generation_rows` for ``model`` on
    its device now (:func:`rows_at_once`)."""
    device = getattr(model, "device", None) or next(model.parameters()).device
    limit = parse_budget(max_memory) if max_memory else None
    budget, source = device_budget(device, limit) if device.type == "cuda" or limit is not None else (None, "")
    expand_segments_under_budget(device, source)
    if device.type == "cuda":
        resident = torch.cuda.memory_allocated(device) + workspaces * CUBLAS_WORKSPACE
        tokens = cache_length(tokens, CACHE_MULTIPLE)  # the static cache's allocated length
    else:
        resident = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    return (budget, source or "max_memory", resident + head_copy_bytes(model) + operand_bytes(model),
            kv_bytes_per_row(model, tokens, share, prompt_len), sampling_bytes_per_row(model, copies),
            prefill_bytes(model))


def rows_at_once(model: nn.Module, max_memory: str | None, rows: int, tokens: int, copies: float = 2.0,
                 share: int = 1, prompt_len: int = 0, workspaces: int = GENERATION_WORKSPACES) -> int:
    """:func:`generation_rows` for ``model`` on its device now: the budget from ``max_memory`` and the device,
    resident bytes as allocated on a GPU (on a CPU: the model's parameters and buffers), plus a head on the host's
    transient device copy (:func:`head_copy_bytes`), the adapters' operands (:func:`operand_bytes`) and, on a GPU,
    the cuBLAS workspaces of the prefill's and the decode graph's streams (counted whole: the trainer frees them
    between phases, ``allocator.release_workspaces``); ``copies``: :func:`sampling_copies` of the settings;
    ``share`` / ``prompt_len``: groups of rows with one prompt (:func:`kv_bytes_per_row`), as many rows a round
    as whole groups make; ``workspaces``: cuBLAS workspaces generation makes (:data:`GENERATION_WORKSPACES`)."""
    budget, source, resident, per_row, transient_row, transient = _terms(model, max_memory, tokens, copies, share,
                                                                         prompt_len, workspaces)
    n = generation_rows(rows, per_row, budget, resident, source, transient_row, transient)
    return n if share <= 1 or n < share or n == rows else n - n % share


def generation_peak(model: nn.Module, max_memory: str | None, rows: int, tokens: int, copies: float = 2.0,
                    share: int = 1, prompt_len: int = 0, workspaces: int = GENERATION_WORKSPACES) -> int:
    """The estimated peak bytes of decoding ``rows`` rows at once (what :func:`rows_at_once` holds to the budget
    less its headroom), for the logs and the benchmark's estimate-against-peak check."""
    _, _, resident, per_row, transient_row, transient = _terms(model, max_memory, tokens, copies, share, prompt_len,
                                                               workspaces)
    return resident + rows * per_row + max(transient, rows * transient_row)


TRAINING_RETRIES = 3  # leaner training plans tried after a training forward runs out of memory
SHRINK = 0.9  # each retry's plans aim at this fraction of the last one's aim


def lower_plan_target(model: nn.Module, factor: float = SHRINK) -> float:
    """Make the next training forward plan its memory again, aiming at ``factor`` of the last aim within the same
    budget (``DecoderModel.plan_target``: the fastest plan under the lower aim, else the leanest plan the budget
    holds); returns the new aim. For a forward that ran out of memory although its plan's estimate fit (the
    estimate missed something: a retry is exact, nothing of that micro-batch has been accumulated yet). Lowering
    the aim, not the budget, keeps the leanest plan within reach when the miss is smaller than the aim's step."""
    decoder = model.model
    decoder.plan_target *= factor
    return decoder.plan_target
