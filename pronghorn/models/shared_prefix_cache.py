"""A static KV cache whose rows come in groups of one prompt: the prompt's keys and values are held once a group.

GRPO samples G completions of each prompt (and ``generate`` may be handed any batch of repeated prompts). A
:class:`~pronghorn.models.kv_cache.StaticKVCache` holds every row's prompt again: for GRPO's 64 rows of 64-token
prompts with 256 new tokens, 20% of the cache is copies. :class:`SharedPrefixCache` keeps

- the prompt's keys/values once per group: [groups, kv_heads, prompt_len, head_dim] a layer, written by a prefill
  of the groups' prompts alone (G times less prefill work);
- the new tokens' keys/values per row: [batch, kv_heads, new, head_dim] a layer;
- one layer's whole keys and values for every row, [batch, kv_heads, prompt_len + new, head_dim], shared by the
  layers: each decode step's attention reads the same slots, masks and values as a static cache's, assembled there
  (the group's prompt, copied per row, then the row's own tokens), so the attention is the static cache's.

Slots, positions, ``index`` and the masks (``decode_masks``, sliding windows included) are those of a static
cache of ``prompt_len + new`` slots. Only decode steps are served after the prefill; ``rows`` views the prompt
buffers of groups (the prefill fills whole groups a forward).
"""

from __future__ import annotations

import torch

from .kv_cache import KVCache, StaticKVCache


class SharedPrefixCache(StaticKVCache):
    """A static cache for ``batch`` rows in groups of ``share`` consecutive rows with one prompt (module
    docstring)."""

    def __init__(self, num_layers: int, batch: int, share: int, kv_heads: int, head_dim: int, prompt_len: int,
                 max_len: int, dtype: torch.dtype, device: torch.device | str):
        if share < 1 or batch % share:
            raise ValueError(f"{batch} rows do not split into groups of {share}")
        if not 0 < prompt_len < max_len:
            raise ValueError(f"prompt length {prompt_len} must be positive and below the cache's {max_len} slots")
        groups, new = batch // share, max_len - prompt_len
        self.share, self.prompt_len = share, prompt_len
        kw = dict(dtype=dtype, device=device)
        self.keys = [torch.zeros(groups, kv_heads, prompt_len, head_dim, **kw) for _ in range(num_layers)]
        self.values = [torch.zeros(groups, kv_heads, prompt_len, head_dim, **kw) for _ in range(num_layers)]
        self.own_keys = [torch.zeros(batch, kv_heads, new, head_dim, **kw) for _ in range(num_layers)]
        self.own_values = [torch.zeros(batch, kv_heads, new, head_dim, **kw) for _ in range(num_layers)]
        self.whole_keys = torch.zeros(batch, kv_heads, max_len, head_dim, **kw)  # one layer's, reused by each
        self.whole_values = torch.zeros_like(self.whole_keys)
        self._decode_state(batch, max_len, dtype, device)

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.decoding:
            raise RuntimeError("the prompt is written through rows() (a prefill of the groups' prompts)")
        p, g = self.prompt_len, self.share
        own = self.index - p
        self.own_keys[layer_idx].index_copy_(2, own, k)
        self.own_values[layer_idx].index_copy_(2, own, v)
        for whole, prompt, mine in ((self.whole_keys, self.keys[layer_idx], self.own_keys[layer_idx]),
                                    (self.whole_values, self.values[layer_idx], self.own_values[layer_idx])):
            b, h, _, d = whole.shape
            whole[:, :, :p].view(b // g, g, h, p, d).copy_(prompt[:, None])
            whole[:, :, p:].copy_(mine)
        return self.whole_keys, self.whole_values

    def rows(self, start: int, end: int) -> KVCache:
        """An empty ``KVCache`` over the prompt buffers of the groups of rows ``start:end`` (whole groups)."""
        if start % self.share or end % self.share:
            raise ValueError(f"rows {start}:{end} are not whole groups of {self.share}")
        view = KVCache.__new__(KVCache)
        view.keys = [k[start // self.share:end // self.share] for k in self.keys]
        view.values = [v[start // self.share:end // self.share] for v in self.values]
        view.max_len, view.length = self.prompt_len, 0
        return view


def shared_rows(input_ids: torch.Tensor, mask: torch.Tensor) -> int:
    """How many consecutive rows of ``input_ids`` / ``mask`` [B, L] share one prompt: G > 1 when the rows are
    groups of G equal rows (G the first row's run), else 1. One host sync."""
    b = input_ids.shape[0]
    if b < 2:
        return 1
    same = ((input_ids == input_ids[:1]) & (mask == mask[:1])).all(-1)
    g = int(same.long().cumprod(0).sum())  # the first row's run
    if g < 2 or b % g:
        return 1
    grouped = lambda t: t.view(b // g, g, -1)  # noqa: E731
    equal = (grouped(input_ids) == grouped(input_ids)[:, :1]).all() & (grouped(mask) == grouped(mask)[:, :1]).all()
    return g if bool(equal) else 1
