"""Next-token selection from logits: repetition penalty, temperature, top-k, top-p, min-p, sampling.

Pure functions on fp32 logits ``[B, V]``. Each equals the transformers logits processor of the same name
(``RepetitionPenaltyLogitsProcessor``, ``TemperatureLogitsWarper``, ``TopKLogitsWarper``,
``TopPLogitsWarper``, ``MinPLogitsWarper`` with ``min_tokens_to_keep=1``), and ``sample_next`` applies
them in the order ``transformers.GenerationMixin.generate`` does: the repetition penalty always, the
warpers (temperature, top-k, top-p, min-p) only when sampling.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_NEG_INF = -float("inf")


def apply_repetition_penalty(
    logits: torch.Tensor, generated_ids: torch.Tensor | None, penalty: float, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Penalise every token already in ``generated_ids`` [B, L] (prompt included): positive logits are
    divided by ``penalty``, negative ones multiplied. ``mask`` [B, L] (0 = ignore, e.g. left padding) leaves
    those positions out, as transformers does with the padding of the prompt."""
    if penalty == 1.0 or generated_ids is None or generated_ids.numel() == 0:
        return logits
    vocab = logits.shape[-1]
    ids = generated_ids.to(logits.device).clamp(max=vocab)  # ids past the head's vocab go to a dropped column
    if mask is not None:
        ids = ids.masked_fill(mask.to(ids.device) == 0, vocab)
    padded = F.pad(logits, (0, 1))
    score = padded.gather(1, ids)
    score = torch.where(score < 0, score * penalty, score / penalty)
    return padded.scatter(1, ids, score)[..., :vocab]


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return logits if temperature == 1.0 else logits / temperature


def apply_top_k(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep the ``top_k`` largest logits (ties with the k-th are kept); 0 disables."""
    if top_k <= 0:
        return logits
    k = min(top_k, logits.shape[-1])
    kth = torch.topk(logits, k).values[..., -1:]
    return logits.masked_fill(logits < kth, _NEG_INF)


def apply_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering: drop the least likely tokens whose total probability is at most ``1 - top_p``;
    the most likely token is always kept. ``top_p >= 1`` disables."""
    if top_p >= 1.0:
        return logits
    sorted_logits, sorted_idx = torch.sort(logits, descending=False)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cum <= (1 - top_p)
    remove_sorted[..., -1:] = False
    remove = remove_sorted.scatter(1, sorted_idx, remove_sorted)
    return logits.masked_fill(remove, _NEG_INF)


def apply_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Keep tokens whose probability is at least ``min_p`` times the top token's; 0 disables."""
    if min_p <= 0.0:
        return logits
    probs = torch.softmax(logits, dim=-1)
    remove = probs < min_p * probs.amax(dim=-1, keepdim=True)
    remove.scatter_(-1, probs.argmax(dim=-1, keepdim=True), False)
    return logits.masked_fill(remove, _NEG_INF)


def check_sampling_args(temperature: float, top_k: int, top_p: float, min_p: float, repetition_penalty: float) -> None:
    """Raise ValueError naming the first out-of-range argument."""
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0 means greedy), got {temperature}")
    if int(top_k) != top_k or top_k < 0:
        raise ValueError(f"top_k must be a non-negative integer (0 disables it), got {top_k}")
    if not 0.0 <= top_p <= 1.0:
        raise ValueError(f"top_p must be in [0, 1] (1 disables it), got {top_p}")
    if not 0.0 <= min_p <= 1.0:
        raise ValueError(f"min_p must be in [0, 1] (0 disables it), got {min_p}")
    if not repetition_penalty > 0:
        raise ValueError(f"repetition_penalty must be > 0 (1 disables it), got {repetition_penalty}")


def process_logits(
    logits: torch.Tensor,
    generated_ids: torch.Tensor | None = None,
    *,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The scores transformers samples from (or takes the argmax of, when not sampling)."""
    logits = apply_repetition_penalty(logits, generated_ids, repetition_penalty, mask)
    if not do_sample or temperature == 0:
        return logits
    logits = apply_temperature(logits, temperature)
    logits = apply_top_k(logits, int(top_k))
    logits = apply_top_p(logits, top_p)
    return apply_min_p(logits, min_p)


def sample_next(
    logits: torch.Tensor,
    generated_ids: torch.Tensor | None = None,
    *,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token ids [B] from logits [B, V] (any float dtype; scored in fp32): argmax when ``do_sample`` is False
    or ``temperature`` is 0, else one multinomial draw (from ``generator``, or torch's global RNG) from the filtered
    distribution (:func:`draw`)."""
    check_sampling_args(temperature, top_k, top_p, min_p, repetition_penalty)
    scores = process_logits(
        logits.float(), generated_ids, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
        min_p=min_p, repetition_penalty=repetition_penalty, mask=mask,
    )
    if not do_sample or temperature == 0:
        return scores.argmax(dim=-1)
    probs = torch.softmax(scores, dim=-1)
    del scores  # two fp32 [B, V] tensors at a time, not three: the decode's memory estimate counts two
    return draw(probs, generator)


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One draw per row of ``probs`` [B, V]: ``torch.multinomial(probs, 1, generator=generator)`` token for token
    (its one-sample path: the argmax of ``probs / q``, ``q ~ Exp(1)`` drawn as ``empty_like(probs).exponential_``),
    without its two host syncs (a check for inf, NaN or negative values, and one for rows that sum to 0: softmax
    makes neither, but each would stall the host once a decode step) and with ``q`` divided in place."""
    q = torch.empty_like(probs).exponential_(1, generator=generator)
    return torch.div(probs, q, out=q).argmax(dim=-1)
