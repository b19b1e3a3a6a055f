"""Autoregressive text generation with a pre-allocated KV cache (greedy or sampled), like transformers'
``model.generate``: same processors, same padding of finished rows, same streamer protocol.

Batched prompts must be LEFT-padded. Position ids are ``cumsum(attention_mask) - 1``, so a padded row
produces the tokens it would produce alone (except on sliding-window layers, whose window counts cache
slots, padding included, exactly as in transformers).

Two decode loops compute the same tokens. The eager one (the reference, and the CPU default) grows its
inputs every step. The static one (``decode_mode="static"`` or ``"graph"``, the CUDA default) decodes
into a :class:`~pronghorn.models.kv_cache.StaticKVCache` with step inputs kept on the device, replays the
step as a CUDA graph (``"graph"``), and looks at the host only every ``SYNC_EVERY`` steps to see whether
every row has stopped (every step when a streamer, stop strings or unseeded sampling need it).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..models.kv_cache import KVCache
from ..models.shared_prefix_cache import shared_rows
from .sampling import check_sampling_args, sample_next
from .static_decode import CACHE_LEN_MULTIPLE, get_runner, graphs_supported

DECODE_MODES = ("auto", "eager", "static", "graph")
SYNC_EVERY = 16  # static loop: decode steps between host checks for "every row has stopped"

# transformers arguments that would change the result if honoured; anything else in **kwargs is ignored.
_UNSUPPORTED = {
    "num_beams": 1, "num_return_sequences": 1, "return_dict_in_generate": False, "output_scores": False,
    "output_logits": False, "assistant_model": None, "prefix_allowed_tokens_fn": None,
}


def generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 128,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    stop_strings: str | Sequence[str] | None = None,
    tokenizer: Any = None,
    streamer: Any = None,
    seed: int | None = None,
    use_cache: bool = True,
    decode_mode: str = "auto",
    cache_multiple: int = CACHE_LEN_MULTIPLE,
    **ignored_hf_kwargs: Any,
) -> torch.LongTensor:
    """Continue each prompt row by up to ``max_new_tokens`` tokens; returns [B, prompt_len + new].

    A row stops after emitting any id in ``eos_token_id`` (default: ``model.config.eos_token_id``; pass
    ``[]`` for none) or once a ``stop_strings`` entry appears in its decoded continuation (needs
    ``tokenizer``; a string that ends inside the last token counts too). The stopping token is kept;
    later positions of a stopped row hold ``pad_token_id`` (default: the first EOS id, else the
    tokenizer's pad/eos id). Generation ends when every row has stopped. ``seed`` makes sampling
    reproducible (a private generator); without it torch's global RNG is used, as transformers does.
    ``streamer.put`` receives the prompt, then each new token; ``streamer.end()`` is called at the end.
    ``decode_mode``: "eager" (reference loop), "static" (static cache, sync-free steps), "graph" (static
    steps replayed as a CUDA graph; CUDA only) or "auto" ("graph" where supported, else "eager").
    ``cache_multiple``: the static cache's length is rounded up to a multiple of it (the default lets one cache
    and graph serve nearby lengths; a caller that decodes once, as GRPO's rollout, passes a small one).
    """
    for name, default in _UNSUPPORTED.items():
        if name in ignored_hf_kwargs and ignored_hf_kwargs[name] not in (default, None):
            raise ValueError(f"generate() does not support {name}={ignored_hf_kwargs[name]!r}")
    check_sampling_args(temperature, top_k, top_p, min_p, repetition_penalty)
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if isinstance(cache_multiple, bool) or not isinstance(cache_multiple, int) or cache_multiple < 1:
        raise ValueError(f"cache_multiple must be a positive int, got {cache_multiple!r}")

    device = model.device
    input_ids = torch.as_tensor(input_ids)
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be a non-empty [batch, length] tensor, got shape {tuple(input_ids.shape)}")
    input_ids = input_ids.to(device=device, dtype=torch.long)
    batch, prompt_len = input_ids.shape
    mask = _check_mask(attention_mask, input_ids)

    eos = _resolve_eos(eos_token_id, model)
    stops = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings or [])
    if stops and tokenizer is None:
        raise ValueError("stop_strings needs the tokenizer: pass generate(..., tokenizer=tokenizer)")
    if any(not s for s in stops):
        raise ValueError(f"stop_strings must be non-empty strings, got {stops!r}")
    if pad_token_id is None:
        pad_token_id = eos[0] if eos else _tokenizer_pad(tokenizer)
    if stops and pad_token_id is None and batch > 1:
        raise ValueError("a stopped row needs a pad_token_id to fill its remaining positions; pass pad_token_id")
    if streamer is not None and batch != 1:
        raise ValueError(f"streamers support a batch of one prompt only; got {batch} prompts")
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(int(seed))
    mode = _pick_mode(decode_mode, model, use_cache)
    switch = longrope_switch(model)
    if mode != "eager" and switch is not None and input_ids.shape[1] <= switch < input_ids.shape[1] + max_new_tokens:
        if decode_mode != "auto":
            raise ValueError(f"decode_mode={decode_mode!r}: this LongRoPE model recomputes its cache once the sequence "
                             f"passes {switch} tokens, which only the eager loop does; use 'eager' or 'auto'")
        mode = "eager"

    states = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.inference_mode():
            sampling = dict(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                            repetition_penalty=repetition_penalty, generator=generator)
            if streamer is not None:
                streamer.put(input_ids.cpu())
            if max_new_tokens == 0:
                out = input_ids
            elif mode == "eager":
                out = _decode(model, input_ids, mask, max_new_tokens, eos, pad_token_id, stops, tokenizer, streamer,
                              use_cache, sampling)
            else:
                out = _decode_static(model, input_ids, mask, max_new_tokens, eos, pad_token_id, stops, tokenizer,
                                     streamer, sampling, mode == "graph", strict=decode_mode == "graph",
                                     cache_multiple=cache_multiple)
            if streamer is not None:
                streamer.end()
    finally:
        for m, training in states:
            m.training = training
    return out.clone()  # an ordinary tensor: inference tensors refuse later in-place edits and autograd


def _decode(model, input_ids, mask, max_new_tokens, eos, pad_id, stops, tokenizer, streamer, use_cache, sampling):
    batch, prompt_len = input_ids.shape
    device = input_ids.device
    padded = not bool(mask.all())
    cfg = model.config

    def new_cache():
        return KVCache(cfg.num_hidden_layers, batch, cfg.num_key_value_heads, cfg.head_dim,
                       prompt_len + max_new_tokens, model.dtype, device) if use_cache else None

    cache = new_cache()
    switch = longrope_switch(model)
    eos_t = torch.tensor(eos, dtype=torch.long, device=device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    unfinished = torch.ones(batch, dtype=torch.bool, device=device)
    seq = input_ids
    out = model(input_ids=seq, attention_mask=mask if padded else None, position_ids=positions,
                past_key_values=cache, logits_to_keep=1)
    for step in range(max_new_tokens):
        next_ids = sample_next(out.logits[:, -1], seq, mask=mask, **sampling)  # scored in fp32 there
        if pad_id is not None:
            next_ids = torch.where(unfinished, next_ids, torch.full_like(next_ids, pad_id))
        seq = torch.cat([seq, next_ids[:, None]], dim=1)
        mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
        if streamer is not None:
            streamer.put(next_ids.cpu())
        if eos:
            unfinished &= ~torch.isin(next_ids, eos_t)
        if stops:
            unfinished &= ~_hits_stop_string(seq[:, prompt_len:], unfinished, stops, tokenizer)
        if step == max_new_tokens - 1 or not bool(unfinished.any()):
            break
        positions = torch.cat([positions, positions[:, -1:] + 1], dim=1)
        if use_cache and switch is not None and seq.shape[1] == switch + 1:
            cache = new_cache()  # its keys were rotated with the short factors: all again with the long ones
            out = model(input_ids=seq, attention_mask=mask if padded else None, position_ids=positions,
                        past_key_values=cache, logits_to_keep=1)
        elif use_cache:
            out = model(input_ids=next_ids[:, None], attention_mask=mask if padded else None,
                        position_ids=positions[:, -1:], past_key_values=cache, logits_to_keep=1)
        else:
            out = model(input_ids=seq, attention_mask=mask if padded else None, position_ids=positions,
                        logits_to_keep=1)
    return seq


def _decode_static(model, input_ids, mask, max_new_tokens, eos, pad_id, stops, tokenizer, streamer, sampling,
                   use_graph, strict, cache_multiple=CACHE_LEN_MULTIPLE):
    """The eager loop's tokens from shape-static steps: tokens go into a preallocated output, stops are
    tracked on the device, and the host checks for "all rows stopped" only every ``SYNC_EVERY`` steps (the
    few extra steps it may run produce padding that is cut off)."""
    batch, prompt_len = input_ids.shape
    padded = not bool(mask.all())
    share = shared_rows(input_ids, mask)  # repeated prompts (GRPO's groups): their keys and values held once
    runner = get_runner(model, batch, prompt_len + max_new_tokens, use_graph, cache_multiple, share, prompt_len)
    runner.strict = strict
    seq = F.pad(input_ids, (0, max_new_tokens), value=pad_id if pad_id is not None else 0)
    full_mask = F.pad(mask, (0, max_new_tokens), value=1)
    eos_t = torch.tensor(eos, dtype=torch.long, device=input_ids.device)
    unfinished = torch.ones(batch, dtype=torch.bool, device=input_ids.device)
    stopped_at = torch.zeros(batch, dtype=torch.long, device=input_ids.device)
    stopping = bool(eos or stops)
    unseeded_sampling = sampling["do_sample"] and sampling["generator"] is None  # keep global RNG use exact
    sync_every = 1 if streamer is not None or stops or unseeded_sampling else SYNC_EVERY

    logits = runner.prefill(model, input_ids, mask, (mask.cumsum(-1) - 1).clamp(min=0), padded)
    done = 0
    for step in range(max_new_tokens):
        end = prompt_len + step
        next_ids = sample_next(logits, seq[:, :end], mask=full_mask[:, :end], **sampling)
        if pad_id is not None:
            next_ids = torch.where(unfinished, next_ids, torch.full_like(next_ids, pad_id))
        seq[:, end] = next_ids
        done = step + 1
        if streamer is not None:
            streamer.put(next_ids.cpu())
        if stopping:
            stop = (next_ids[:, None] == eos_t).any(-1) if eos else torch.zeros_like(unfinished)
            if stops:
                stop |= _hits_stop_string(seq[:, prompt_len:end + 1], unfinished, stops, tokenizer)
            stop &= unfinished
            stopped_at = torch.where(stop, step, stopped_at)
            unfinished &= ~stop
        if step == max_new_tokens - 1:
            break
        if stopping and done % sync_every == 0 and not bool(unfinished.any()):
            break
        logits = runner.step(model, next_ids)
    if stopping and not bool(unfinished.any()):
        done = int(stopped_at.max()) + 1
    return seq[:, : prompt_len + done]


def longrope_switch(model: nn.Module) -> int | None:
    """The length past which a LongRoPE model (Phi-3) takes its long factors, or None. transformers' Phi-3
    recomputes the whole cache when a generated sequence first passes it, and so does the eager loop here."""
    rope = getattr(getattr(model, "config", None), "rope", None) or {}
    return rope.get("original_max_position_embeddings") if rope.get("rope_type") == "longrope" else None


def _pick_mode(decode_mode: str, model: nn.Module, use_cache: bool) -> str:
    if decode_mode not in DECODE_MODES:
        raise ValueError(f"decode_mode must be one of {DECODE_MODES}, got {decode_mode!r}")
    if not use_cache:
        if decode_mode in ("static", "graph"):
            raise ValueError(f"decode_mode={decode_mode!r} decodes into a KV cache; it needs use_cache=True")
        return "eager"
    if decode_mode == "auto":
        return "graph" if graphs_supported(model) else "eager"
    if decode_mode == "graph" and not graphs_supported(model):
        raise ValueError("decode_mode='graph' needs a model on a CUDA device whose rope is not dynamic NTK "
                         "(which reads positions on the host each step); use 'static' or 'eager'")
    return decode_mode


def _check_mask(attention_mask: torch.Tensor | None, input_ids: torch.Tensor) -> torch.Tensor:
    if attention_mask is None:
        return torch.ones_like(input_ids)
    mask = torch.as_tensor(attention_mask).to(input_ids.device)
    if mask.dim() == 1:
        mask = mask[None]
    if mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(mask.shape)} != input_ids shape {tuple(input_ids.shape)}")
    mask = (mask != 0).long()
    empty = (mask.sum(-1) == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"prompt row(s) {empty} have no tokens (attention_mask is all zeros)")
    bad = (mask[:, 1:] < mask[:, :-1]).any(-1).nonzero().flatten().tolist()
    if bad:
        raise ValueError(
            f"prompt row(s) {bad} are right-padded (attention_mask has zeros after real tokens); generation needs "
            "LEFT padding: set tokenizer.padding_side = 'left' before tokenizing the batch"
        )
    return mask


def _resolve_eos(eos_token_id, model) -> list[int]:
    if eos_token_id is None:
        eos_token_id = getattr(getattr(model, "config", None), "eos_token_id", None)
    if eos_token_id is None:
        return []
    if isinstance(eos_token_id, torch.Tensor):
        eos_token_id = eos_token_id.flatten().tolist()
    if isinstance(eos_token_id, int):
        return [eos_token_id]
    return [int(e) for e in eos_token_id]


def _tokenizer_pad(tokenizer) -> int | None:
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    return None


def _hits_stop_string(new_ids: torch.Tensor, active: torch.Tensor, stops: list[str], tokenizer) -> torch.Tensor:
    """True for each active row whose last token completes a stop string in the decoded continuation.

    Only a tail of the continuation is decoded: a character is at most 4 byte tokens, so the tail spans
    more characters than the longest stop string."""
    tail = 4 * max(len(s) for s in stops) + 8
    hit = torch.zeros_like(active)
    rows = new_ids[:, -tail - 1:].tolist()
    for b in active.nonzero().flatten().tolist():
        ids = rows[b]
        text = tokenizer.decode(ids, skip_special_tokens=False)
        before = tokenizer.decode(ids[:-1], skip_special_tokens=False) if len(ids) > 1 else ""
        for s in stops:
            if text.find(s, max(0, len(before) - len(s) + 1)) != -1:
                hit[b] = True
                break
    return hit
