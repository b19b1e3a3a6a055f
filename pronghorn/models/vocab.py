"""Growing the vocabulary: ``add_new_tokens`` (Unsloth's name) and the table resize it and adapter loading share.

New rows of the input embedding and of the output head start as the mean of the rows of the tokens the tokenizer
already had (a tied table is resized once). A new token then starts as an "average" token instead of a random
one, so the loss does not jump when it first appears (Unsloth's ``add_new_tokens`` initialises them so too). As in Unsloth, adding tokens makes the embeddings and the
head train fully beside the adapters: ``get_peft_model`` adds them to ``modules_to_save`` (and a model that has
adapters already gets them added now), since the new rows learn nothing otherwise.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import PronghornError


@torch.no_grad()
def resize_vocab(model: nn.Module, rows: int, known: int | None = None) -> None:
    """Give the input embedding and the output head ``rows`` rows; rows from ``known`` on (default: the current
    number of rows) are set to the mean of rows ``[0, known)``. ``config.vocab_size`` follows."""
    embed = model.get_input_embeddings()
    head = model.get_output_embeddings()
    old = embed.weight
    have = old.shape[0]
    known = have if known is None else min(known, have)
    if rows < have:
        raise PronghornError(f"the vocabulary has {have} rows; it cannot shrink to {rows}")
    if getattr(model, "device", old.device) != old.device:
        raise PronghornError("the input embedding is offloaded to the host (offload_embedding); load without it "
                             "to add tokens (their rows must train)")
    tied = head is not None and head.weight is old
    embed.weight = _grown(old, rows, known)
    embed.num_embeddings = rows
    if head is not None:
        head.weight = embed.weight if tied else _grown(head.weight, rows, known)
        head.out_features = rows
    cfg = model.config
    cfg.vocab_size = rows
    if getattr(cfg, "hf_config", None) is not None:
        cfg.hf_config["vocab_size"] = rows  # what the merged export's config.json says
    decoder = getattr(model, "model", None)
    if decoder is not None:
        decoder.__dict__.pop("_plans", None)  # memory plans counted the old table


def _grown(weight: torch.Tensor, rows: int, known: int) -> nn.Parameter:
    new = torch.empty(rows, weight.shape[1], dtype=weight.dtype, device=weight.device)
    new[: weight.shape[0]] = weight
    new[known:] = weight[:known].float().mean(0).to(weight.dtype)
    return nn.Parameter(new, requires_grad=weight.requires_grad)


def add_new_tokens(model: nn.Module, tokenizer, new_tokens: list[str] | str, special: bool = False) -> int:
    """Add ``new_tokens`` to ``tokenizer`` (as special tokens with ``special=True``) and grow the model's embedding
    and head for them, each new row the mean of the existing tokens' rows. Returns how many tokens were new
    (tokens the tokenizer already has are left as they are). The embeddings and head then train fully beside the
    adapters (``modules_to_save``, as Unsloth does; see the module docstring); save the tokenizer with the
    adapter (``tokenizer.save_pretrained(dir)``) so the adapter directory reloads with it."""
    if isinstance(new_tokens, str):
        new_tokens = [new_tokens]
    bad = [t for t in new_tokens if not isinstance(t, str) or not t]
    if bad or not new_tokens:
        raise PronghornError(f"add_new_tokens needs a list of non-empty strings, got {new_tokens!r}")
    known = len(tokenizer)
    added = tokenizer.add_tokens(list(new_tokens), special_tokens=special)
    if added == 0:
        return 0
    rows = model.get_input_embeddings().weight.shape[0]
    resize_vocab(model, max(rows, len(tokenizer)), known)
    model.needs_embedding_training = True
    if getattr(model, "lora_config", None) is not None:  # adapters attached already: train the tables now
        from .lora import TRAINABLE_MODULES, train_fully

        train_fully(model, list(TRAINABLE_MODULES))
    return added
