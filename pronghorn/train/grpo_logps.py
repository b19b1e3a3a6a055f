"""Per-token log-probs of completions from one padding-free forward: the training forward of GRPO.

B prompt + completion sequences are concatenated into one row of S tokens whose ``position_ids`` restart at 0
for each sequence, so the model's document mask keeps them apart (as SFT packing does, data/packing.py): no
padding token is computed. Only the positions that predict a completion token reach the output head
(``keep_rows``), through the chunked :func:`~pronghorn.kernels.linear_logprobs.linear_logprobs`: the
[tokens x vocab] logits never exist. It is one call of the model's forward (``return_token_logps``), so a DDP /
FSDP wrapper sees it. The log-probs are those of ``softmax(logits / temperature)``, TRL's
(the head is applied to ``hidden / temperature``, the same logits divided; a soft-capped family at a
temperature other than 1 goes through its capped logits instead, which are divided). They come back as [B, T]
(T: ``width``, at least the longest completion), 0 after each completion's end. The training forward also asks
for each token's entropy of that distribution (TRL's ``entropy`` metric), from the same logits chunks.

A completion left out of the loss (``mask_truncated_completions``) is not packed at all: its mask row and its
log-probs are 0, and a micro-batch with nothing left runs no forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from ..data.collate import batch_to_device
from ..errors import PronghornError
from ..kernels import IGNORE_INDEX
from ..models.decoder import DecoderForCausalLM


@dataclass
class PackedCompletions:
    """Host tensors of B packed sequences: ``input_ids`` / ``position_ids`` [1, S], ``targets`` [S] (the next
    token where it is a completion token, else IGNORE_INDEX), ``keep_rows`` [n] (those positions, in order),
    ``dest`` [n] (where each lands in the flattened [B, width] output) and the mask [B, width]."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    targets: torch.Tensor
    keep_rows: torch.Tensor
    dest: torch.Tensor
    mask: torch.Tensor

    @property
    def tokens(self) -> int:
        return self.input_ids.shape[1]


def pack_completions(prompt_ids: Sequence[list[int]], completion_ids: Sequence[list[int]], width: int,
                     trained: Sequence[bool] | None = None) -> PackedCompletions:
    """B prompt + completion sequences in one row; ``trained[b]`` False leaves sequence b out (mask row 0)."""
    ids, pos, targets, keep, dest = [], [], [], [], []
    mask = torch.zeros(len(completion_ids), width)
    for b, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
        if len(c) > width:
            raise PronghornError(f"completion {b} has {len(c)} tokens, more than the width {width}")
        if trained is not None and not trained[b]:
            continue
        start = len(ids)
        seq = list(p) + list(c)
        ids += seq
        pos += range(len(seq))
        targets += [IGNORE_INDEX] * (len(p) - 1) + list(c) + [IGNORE_INDEX]
        keep += range(start + len(p) - 1, start + len(p) - 1 + len(c))
        dest += range(b * width, b * width + len(c))
        mask[b, :len(c)] = 1
    long = dict(dtype=torch.long)
    return PackedCompletions(torch.tensor([ids], **long), torch.tensor([pos], **long), torch.tensor(targets, **long),
                             torch.tensor(keep, **long), torch.tensor(dest, **long), mask)


def packed_logps(model: nn.Module, packed: PackedCompletions, temperature: float = 1.0, entropy: bool = False,
                 forward: nn.Module | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """[B, width] fp32 (fp64 for an fp64 model) log-probs of the completion tokens (0 elsewhere), differentiable
    when grad is enabled; with ``entropy`` also the [B, width] entropy of each token's distribution (no grad).
    ``forward``: what to call for the forward, the model's DDP / FSDP wrapper when data-parallel (it must see
    the forward); default ``model``."""
    if not isinstance(model, DecoderForCausalLM):
        raise PronghornError("GRPO's packed training forward needs a pronghorn model (FastLanguageModel"
                             ".from_pretrained); for a transformers / PEFT model use TRL's GRPOTrainer")
    forward = model if forward is None else forward
    B, width = packed.mask.shape
    if not packed.tokens:  # every completion left out: nothing to run
        zeros = torch.zeros(B, width, dtype=torch.float64 if model.dtype == torch.float64 else torch.float32,
                            device=model.device)
        return (zeros, zeros.clone()) if entropy else zeros
    dev = batch_to_device({"input_ids": packed.input_ids, "position_ids": packed.position_ids,
                           "targets": packed.targets, "keep_rows": packed.keep_rows, "dest": packed.dest},
                          model.device)
    if model.config.parts.final_softcap and temperature != 1.0:  # softcap(logits) / T: through the capped logits
        logits = forward(input_ids=dev["input_ids"], position_ids=dev["position_ids"], return_logits=True).logits[0]
        picked = logits.index_select(0, dev["keep_rows"]).to(torch.float32 if logits.dtype != torch.float64
                                                              else logits.dtype) / temperature
        logp = picked.log_softmax(-1)
        tok = logp.gather(-1, dev["targets"][dev["keep_rows"]].unsqueeze(-1)).squeeze(-1)
        ent = -(logp.detach().exp() * logp.detach()).sum(-1) if entropy else None
    else:  # the chunked head; targets are already shifted (position i's own next token)
        targets = dev["targets"][None]
        out = forward(input_ids=dev["input_ids"], position_ids=dev["position_ids"], labels=targets,
                      shift_labels=targets, return_token_logps=True, keep_rows=dev["keep_rows"],
                      temperature=temperature, return_entropy=entropy)
        tok = out["token_logps"][0].index_select(0, dev["keep_rows"])
        ent = out["token_entropy"][0].index_select(0, dev["keep_rows"]) if entropy else None

    def spread(values: torch.Tensor) -> torch.Tensor:  # [n] kept positions -> [B, width], 0 elsewhere
        out = torch.zeros(B * width, dtype=tok.dtype, device=tok.device)
        return out.index_copy(0, dev["dest"], values.to(tok.dtype)).view(B, width)

    return (spread(tok), spread(ent)) if entropy else spread(tok)
