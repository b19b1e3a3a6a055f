"""Sequence-tiled MLP: the post-attention norm and gated MLP applied to chunks of tokens, one chunk at a time.

At long context the largest tensors of a decoder layer are the MLP's [tokens, intermediate] ones (gate, up,
their SwiGLU product and the three gradients: 6 x 28 KiB per token for the Llama-3.1-8B config in bf16). The
norm and the MLP act on each token alone, so :func:`sequence_tiled` runs them over chunks of ``chunk`` tokens:
the forward keeps only the block's input, and the backward recomputes and back-propagates one chunk at a time,
accumulating the gradients of the trainable parameters (LoRA A/B) across chunks. Only one chunk's
intermediates ever exist. The cost is one more forward of the block per step (small at long context, where
attention dominates); when the whole layer is replayed for its backward (checkpointing), that replay skips the
tiled block, whose forward keeps nothing, and each chunk's replay skips down_proj's matmul (output unused). NF4 bases are dequantized inside each chunk, as they are untiled. The adapters are cast to their compute dtype once
for all chunks and their replays (kernels/adapter_operands.py).

Exact: the same ops on row slices (a GPU matmul of fewer rows may round differently; the adapters' gradients
are sums over chunks). Recomputation replays the forward's RNG (LoRA dropout draws its masks chunk by chunk, so
they are other draws than an untiled forward's), autocast state and kernel choice.

The switch (``DecoderForCausalLM.gradient_checkpointing_enable(tiled_mlp=...)``, ``TrainConfig.tiled_mlp``):

- ``"off"``: never tiled;
- ``"on"``: tiled whenever a forward has more than ``chunk`` tokens (batch x sequence);
- ``"auto"`` (the default): tiled in training when the memory plan needs it (models/memory_plan.py).
"""

from __future__ import annotations

import torch

from ..errors import PronghornError
from ..kernels.adapter_operands import open_store, operands_kept
from .recompute import parse_mode, rng_state, set_rng_state

MODES = ("off", "on", "auto")
DEFAULT_CHUNK = 8192  # tokens: a chunk of 8B-config intermediates is 224 MiB per [chunk, 14336] bf16 tensor


def tiled_mlp_mode(value) -> str:
    """The mode for a user's setting: ``True`` -> on, ``False``/``None`` -> off, or one of :data:`MODES`."""
    mode = parse_mode(value, MODES, {"true": "on", "false": "off", "none": "off"})
    if mode is not None:
        return mode
    raise PronghornError(f"tiled_mlp must be one of {MODES}, True or False; got {value!r}")


def chunk_tokens(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PronghornError(f"tiled_mlp_chunk must be a positive number of tokens, got {value!r}")
    return value


def sequence_tiled(fn, x: torch.Tensor, chunk: int, params, output_unused: bool = False) -> torch.Tensor:
    """``fn(x, output_unused)`` for a token-wise ``fn`` ([..., in] -> [..., out], each token alone), computed over
    chunks of ``chunk`` tokens (the leading dimensions flattened). ``params``: the tensors ``fn`` uses that may
    need a gradient (its modules' parameters); their gradients accumulate over the chunks. ``output_unused``: the
    caller throws the values away (a layer replayed for its backward): the forward computes nothing."""
    params = [p for p in params if p.requires_grad]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[0] <= chunk:
        return fn(x, output_unused)
    if torch.is_grad_enabled() and (x.requires_grad or params):
        y = _SequenceTiled.apply(fn, chunk, params, output_unused, x2, *params)
    else:
        y = _in_chunks(fn, x2, chunk)
    return y.view(*x.shape[:-1], y.shape[-1])


def _in_chunks(fn, x2: torch.Tensor, chunk: int) -> torch.Tensor:
    out = None
    for start in range(0, x2.shape[0], chunk):
        y = fn(x2[start:start + chunk], False)
        if out is None:
            out = y.new_empty((x2.shape[0], y.shape[-1]))
        out[start:start + chunk] = y
    return out


class _SequenceTiled(torch.autograd.Function):
    """``apply(fn, chunk, params, output_unused, x2, *params)``: saves ``x2`` alone; the backward replays ``fn``
    chunk by chunk (each chunk's output values unused: only its graph is)."""

    @staticmethod
    def forward(ctx, fn, chunk, params, output_unused, x2, *flat_params):
        ctx.fn, ctx.chunk, ctx.params = fn, chunk, params
        ctx.rng = rng_state(x2.device)
        ctx.autocast = (torch.is_autocast_enabled(x2.device.type), torch.get_autocast_dtype(x2.device.type))
        ctx.save_for_backward(x2)
        ctx.operands = open_store()  # the adapters' operands, made once for all chunks and their replays
        with operands_kept(ctx.operands):
            if output_unused:  # a layer replayed for its backward: nothing here is kept
                probe = fn(x2[:1], True)  # the output's width and dtype
                return probe.new_empty((x2.shape[0], probe.shape[-1]))
            return _in_chunks(fn, x2, chunk)

    @staticmethod
    def backward(ctx, dy):
        (x2,) = ctx.saved_tensors
        need_x = ctx.needs_input_grad[4]
        wanted = [i for i, need in enumerate(ctx.needs_input_grad[5:]) if need]
        params = [ctx.params[i] for i in wanted]
        if not need_x and not params:
            return (None,) * (5 + len(ctx.params))
        dy = dy.reshape(-1, dy.shape[-1])
        dx = torch.empty_like(x2) if need_x else None
        sums: list[torch.Tensor | None] = [None] * len(params)
        device = x2.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], device_type=device.type):
            set_rng_state(device, ctx.rng)  # the chunks replay in the forward's order: same dropout masks
            with torch.enable_grad(), torch.autocast(device.type, ctx.autocast[1], enabled=ctx.autocast[0]), \
                    operands_kept(ctx.operands):
                for start in range(0, x2.shape[0], ctx.chunk):
                    xc = x2[start:start + ctx.chunk].detach().requires_grad_(need_x)
                    yc = ctx.fn(xc, True)
                    grads = torch.autograd.grad(yc, ([xc] if need_x else []) + params, dy[start:start + ctx.chunk],
                                                allow_unused=True)
                    del yc
                    if need_x:
                        dx[start:start + ctx.chunk] = grads[0]
                        grads = grads[1:]
                    for i, g in enumerate(grads):  # out of place: a gradient may alias dy (parameter-sized)
                        if g is not None:
                            sums[i] = g if sums[i] is None else sums[i] + g
        ctx.operands = None
        out = [None] * len(ctx.params)
        for i, g in zip(wanted, sums):
            out[i] = g
        return (None, None, None, None, dx, *out)
