"""Pre-allocated key/value caches for incremental decoding (one buffer per layer, filled in place).

``KVCache`` tracks its fill on the host (``length``) and hands attention the filled prefix: the eager
reference. ``StaticKVCache`` is the same buffers plus a decode mode in which the write slot lives in a
device tensor and attention always sees all ``max_len`` slots behind an additive mask: every decode step
then has the same shapes and no host synchronisation, so it can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of shape [batch, kv_heads, max_len, head_dim] per layer; ``length`` tokens are filled."""

    def __init__(self, num_layers: int, batch: int, kv_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (batch, kv_heads, max_len, head_dim)
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_len = max_len
        self.length = 0

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v [B, Hk, T, D] after the filled part; return all keys/values so far (views)."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} tokens; {end} requested")
        self.keys[layer_idx][:, :, start:end] = k
        self.values[layer_idx][:, :, start:end] = v
        return self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def decode_masks(self, windows: set, dtype: torch.dtype) -> dict | None:
        """Attention masks per sliding window the cache supplies itself (None: the model builds them)."""
        return None

    def reorder(self, index: torch.Tensor) -> None:
        """Keep only the batch rows in ``index`` (e.g. after some sequences finished)."""
        self.keys = [k.index_select(0, index) for k in self.keys]
        self.values = [v.index_select(0, index) for v in self.values]


class StaticKVCache(KVCache):
    """A ``KVCache`` whose decode steps are shape-static and sync-free.

    Fill it like a ``KVCache`` (the prompt, one forward), then call :meth:`start_decoding` with the prompt's
    attention mask. From then on each forward of one token writes its keys/values at the device-side slot
    ``index`` (``index_copy_``), attends to every slot through the additive masks of :meth:`decode_masks`
    (slots not yet written, prompt padding and slots outside a sliding window get ``-inf``) and
    :meth:`advance` bumps ``index`` on the device. Buffers start zeroed so unwritten slots stay finite
    (a masked ``NaN`` would still poison the attention output).
    """

    def __init__(self, num_layers: int, batch: int, kv_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype, device: torch.device | str):
        super().__init__(num_layers, batch, kv_heads, head_dim, max_len, dtype, device)
        for buf in self.keys + self.values:
            buf.zero_()
        self._decode_state(batch, max_len, dtype, device)

    def _decode_state(self, batch: int, max_len: int, dtype: torch.dtype, device: torch.device | str) -> None:
        """The device-side slot, slot numbers, key mask and mask constants of the decode steps."""
        self.max_len, self.length = max_len, 0
        self.slots = torch.arange(max_len, device=device)
        self.index = torch.zeros(1, dtype=torch.long, device=device)
        self.key_mask = torch.ones(batch, max_len, dtype=torch.bool, device=device)
        self._zero = torch.zeros((), dtype=dtype, device=device)
        self._neg_inf = torch.full((), float("-inf"), dtype=dtype, device=device)
        self.decoding = False

    def reset(self) -> None:
        """Empty the cache for a new prompt (buffers are reused, not cleared: unfilled slots are masked)."""
        self.length, self.decoding = 0, False

    def start_decoding(self, prompt_mask: torch.Tensor | None) -> None:
        """Switch to static decode steps after the prompt (``length`` tokens, ``prompt_mask`` [B, length]
        with 0 for padding, or None for none) has been written."""
        self.key_mask.fill_(True)
        if prompt_mask is not None:
            self.key_mask[:, : self.length].copy_(prompt_mask.bool())
        self.index.fill_(self.length)
        self.decoding = True

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.decoding:
            return super().update(layer_idx, k, v)
        self.keys[layer_idx].index_copy_(2, self.index, k)
        self.values[layer_idx].index_copy_(2, self.index, v)
        return self.keys[layer_idx], self.values[layer_idx]

    def advance(self, n: int) -> None:
        if self.decoding:
            self.index.add_(n)
        else:
            self.length += n

    def decode_masks(self, windows: set, dtype: torch.dtype) -> dict | None:
        """{window: additive mask [B, 1, 1, max_len]} for the one query at slot ``index``: a slot is visible
        when written (``<= index``), not prompt padding, and, for a sliding window ``w``, ``> index - w``
        (the window counts slots, padding included, as the eager path and transformers do)."""
        if not self.decoding:
            return None
        visible = self.key_mask & (self.slots <= self.index)
        masks = {}
        for w in windows:
            allowed = visible if w is None else visible & (self.slots > self.index - w)
            masks[w] = torch.where(allowed, self._zero, self._neg_inf).to(dtype)[:, None, None, :]
        return masks

    def rows(self, start: int, end: int) -> KVCache:
        """An empty ``KVCache`` over batch rows ``start:end`` of these buffers (views: what it stores lands here),
        to fill the prompt a group of rows at a time."""
        view = KVCache.__new__(KVCache)
        view.keys = [k[start:end] for k in self.keys]
        view.values = [v[start:end] for v in self.values]
        view.max_len, view.length = self.max_len, 0
        return view

    def reorder(self, index: torch.Tensor) -> None:
        raise NotImplementedError("a static cache keeps its batch rows (finished rows are padded instead)")
