"""NF4 weight storage in the bitsandbytes layout (QLoRA), and its dequantization.

A weight ``W`` [out, in] is flattened and cut into blocks of ``blocksize`` (64) values. Each block keeps its
absolute maximum ``absmax`` (fp32) and, per value, the 4-bit index of the NF4 code nearest to
``value * (1 / absmax)``; two indices share a byte, the first value in the high nibble. With double
quantization (``compress_statistics``) the absmax vector is itself stored in 8 bits: its mean ``offset`` is
subtracted and the rest is quantized with bitsandbytes' signed dynamic map in blocks of 256, each with an fp32
``nested_absmax``. Dequantization is ``code[q] * (nested_map[qa] * nested_absmax + offset)`` in fp32, rounded
to the compute dtype once: the same arithmetic, in the same order, as bitsandbytes, so either library reads
the other's tensors to identical values.

``NF4Weight`` holds those tensors as buffers of an ``nn.Module`` so ``model.to(device)`` moves them, while
``model.to(dtype)`` leaves them alone (every buffer is an integer tensor; fp32 statistics are kept as int32
bit patterns). Its ``state_dict`` uses the names of bitsandbytes' ``Linear4bit`` / "...-bnb-4bit"
checkpoints: ``<name>.weight`` (packed uint8 [(n + 1) // 2, 1]), ``.weight.absmax``, ``.weight.quant_map``,
``.weight.nested_absmax``, ``.weight.nested_quant_map`` and ``.weight.quant_state.bitsandbytes__nf4`` (the
JSON of the non-tensor fields, as uint8 bytes).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math

import torch
from torch import nn

from ..errors import CheckpointError
from .triton_support import use_triton


@contextlib.contextmanager
def dequantized_once(weights):
    """Inside the block each of these NF4 ``weights`` is dequantized once per dtype and the tensor reused (a
    layer replayed for its backward would dequantize each weight twice: in the replay and in the backward).
    Costs their dense copies until the block ends (``NF4Weight.reuse``: the cache, None outside)."""
    weights = [w for w in weights if isinstance(w, NF4Weight)]
    for w in weights:
        w.reuse = {}
    try:
        yield
    finally:
        for w in weights:
            w.reuse = None

# The 16 NF4 levels (quantiles of N(0, 1), normalised to [-1, 1], with an exact zero) as float32.
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
STATE_KEY = "quant_state.bitsandbytes__nf4"
BNB_KEYS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", STATE_KEY)
_CHUNK = 1 << 22  # values quantized per step (bounds the fp32 temporaries to tens of MB)
_TINY = 1e-38  # absmax floor: an all-zero block quantizes to the zero code instead of 0 / 0


def nf4_code(device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)


@functools.cache
def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (256 sorted fp32 values in [-1, 1]) for the absmax statistics.

    Seven decades 10^-6 .. 10^0; decade ``i`` holds 2^i values (the midpoints of a float32 linspace of 0.1..1)
    of each sign; plus 0 and 1.
    """
    values = [0.0, 1.0]
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        scaled = (10 ** (i - 6)) * mids  # float32 arithmetic, as the reference construction
        values += scaled.tolist() + (-scaled).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)


def _f32_bits(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32).clone().view(torch.int32)  # own storage (never a cached table)


def _bits_f32(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.float32)


class NF4Weight(nn.Module):
    """A frozen [out, in] weight stored as NF4 (bitsandbytes layout). Not a tensor: call ``dequantize()``."""

    reuse: dict | None = None  # dtype -> dense weight, inside dequantized_once

    def __init__(self, packed: torch.Tensor, absmax: torch.Tensor, shape, dtype: torch.dtype, blocksize: int = 64,
                 quant_map: torch.Tensor | None = None, nested_absmax: torch.Tensor | None = None,
                 nested_quant_map: torch.Tensor | None = None, offset: float | torch.Tensor | None = None,
                 nested_blocksize: int = 256):
        super().__init__()
        self._shape = torch.Size(shape)
        self.dtype = dtype  # compute dtype: what dequantize() returns by default
        self.blocksize = int(blocksize)
        self.nested_blocksize = int(nested_blocksize)
        device = packed.device
        self.register_buffer("packed", packed.reshape(-1).contiguous())
        qmap = nf4_code(device) if quant_map is None else quant_map
        self.register_buffer("quant_map", _f32_bits(qmap.to(device)))
        self.double_quant = nested_absmax is not None
        if self.double_quant:
            if absmax.dtype != torch.uint8 or offset is None:
                raise ValueError("double-quantized absmax must be uint8 with an offset")
            nmap = dynamic_map() if nested_quant_map is None else nested_quant_map
            self.register_buffer("absmax", absmax.reshape(-1).contiguous())
            self.register_buffer("nested_absmax", _f32_bits(nested_absmax.reshape(-1).to(device)))
            self.register_buffer("nested_quant_map", _f32_bits(nmap.to(device)))
            offset = torch.as_tensor(offset, dtype=torch.float32).reshape(1).to(device)
            self.register_buffer("offset", _f32_bits(offset))
        else:
            self.register_buffer("absmax", _f32_bits(absmax.reshape(-1)))
        self._check()

    def _check(self) -> None:
        n = self.numel()
        blocks = -(-n // self.blocksize)
        if self.packed.dtype != torch.uint8 or self.packed.numel() != (n + 1) // 2:
            raise ValueError(f"packed NF4 data must be {(n + 1) // 2} uint8 values for shape {tuple(self._shape)}, "
                             f"got {self.packed.numel()} {self.packed.dtype}")
        if self.absmax.numel() != blocks:
            raise ValueError(f"absmax must have {blocks} entries (blocksize {self.blocksize}), "
                             f"got {self.absmax.numel()}")
        if self.double_quant and self.nested_absmax.numel() != -(-blocks // self.nested_blocksize):
            raise ValueError(f"nested_absmax must have {-(-blocks // self.nested_blocksize)} entries, "
                             f"got {self.nested_absmax.numel()}")
        if self.quant_map.numel() != 16:
            raise ValueError(f"quant_map must have 16 entries, got {self.quant_map.numel()}")

    @property
    def shape(self) -> torch.Size:
        return self._shape

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def numel(self) -> int:
        return math.prod(self._shape)

    def with_dtype(self, dtype: torch.dtype) -> NF4Weight:
        """Set the compute dtype (what ``dequantize()`` returns); the stored bits do not change."""
        self.dtype = dtype
        return self

    def code(self) -> torch.Tensor:
        return _bits_f32(self.quant_map)

    def block_absmax(self) -> torch.Tensor:
        """The fp32 absmax of every block (double quantization undone exactly as bitsandbytes does)."""
        if not self.double_quant:
            return _bits_f32(self.absmax)
        blocks = self.absmax.numel()
        scale = _bits_f32(self.nested_absmax).repeat_interleave(self.nested_blocksize)[:blocks]
        return _bits_f32(self.nested_quant_map)[self.absmax.long()] * scale + _bits_f32(self.offset)

    def dequantize(self, dtype: torch.dtype | None = None, reference: bool = False) -> torch.Tensor:
        """The [out, in] weight in ``dtype`` (default: the compute dtype). Triton on CUDA, PyTorch elsewhere
        (and with ``reference``); inside :func:`dequantized_once` computed once per dtype."""
        dtype = dtype or self.dtype
        cache = self.reuse
        if cache is not None and dtype in cache:
            return cache[dtype]
        if not reference and use_triton(self.packed):
            from .nf4_triton import dequantize_nf4_triton

            w = dequantize_nf4_triton(self, dtype)
        else:
            w = dequantize_nf4_reference(self, dtype)
        if cache is not None:
            cache[dtype] = w
        return w

    def extra_repr(self) -> str:
        return (f"shape={tuple(self._shape)}, dtype={self.dtype}, blocksize={self.blocksize}, "
                f"double_quant={self.double_quant}")

    # --- bitsandbytes state-dict layout -------------------------------------------------------------------

    def bnb_tensors(self) -> dict[str, torch.Tensor]:
        """This weight as bitsandbytes serializes it: {"": packed, "absmax": ..., STATE_KEY: json bytes}."""
        state = {"quant_type": "nf4", "blocksize": self.blocksize, "dtype": str(self.dtype).removeprefix("torch."),
                 "shape": list(self._shape)}
        out = {"": self.packed.reshape(-1, 1)}
        if self.double_quant:
            out["absmax"] = self.absmax
        else:
            out["absmax"] = _bits_f32(self.absmax)
        out["quant_map"] = self.code()
        if self.double_quant:
            out["nested_absmax"] = _bits_f32(self.nested_absmax)
            out["nested_quant_map"] = _bits_f32(self.nested_quant_map)
            state.update(nested_blocksize=self.nested_blocksize, nested_dtype="float32",
                         nested_offset=_bits_f32(self.offset).item())
        out[STATE_KEY] = torch.tensor(list(json.dumps(state).encode("utf-8")), dtype=torch.uint8)
        return out

    @classmethod
    def from_bnb_tensors(cls, tensors: dict[str, torch.Tensor], dtype: torch.dtype | None = None,
                         source: str = "checkpoint") -> NF4Weight:
        """Inverse of ``bnb_tensors`` (keys relative to ``<name>.weight``; ``""`` is the packed data)."""
        try:
            state = json.loads(bytes(tensors[STATE_KEY].reshape(-1).tolist()).decode("utf-8"))
        except (KeyError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{source}: unreadable bitsandbytes quant_state ({type(e).__name__}: {e})") from None
        if state.get("quant_type") != "nf4":
            raise CheckpointError(f"{source}: quant_type {state.get('quant_type')!r} is not supported (only nf4)")
        try:
            nested = "nested_absmax" in tensors
            packed = tensors[""]
            if packed.dtype != torch.uint8:  # bnb_4bit_quant_storage other than uint8: same bytes
                packed = packed.contiguous().view(torch.uint8)
            stored = getattr(torch, state.get("dtype", "bfloat16"))
            return cls(packed, tensors["absmax"], state["shape"], dtype or stored, state["blocksize"],
                       tensors["quant_map"].float(),
                       tensors["nested_absmax"].float() if nested else None,
                       tensors["nested_quant_map"].float() if nested else None,
                       state.get("nested_offset") if nested else None, state.get("nested_blocksize", 256))
        except (KeyError, ValueError, AttributeError) as e:
            raise CheckpointError(f"{source}: malformed bitsandbytes NF4 tensors ({type(e).__name__}: {e})") from None

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        base = prefix[:-1]  # "<module>.weight"
        for key, t in self.bnb_tensors().items():
            destination[f"{base}.{key}" if key else base] = t

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # The parent renames bitsandbytes' "<name>.weight" (packed data) to "<name>.weight.packed" beforehand
        # (``Linear._load_from_state_dict``): torch hands a child only the keys under its own prefix.
        base = prefix[:-1]
        keys = {"": f"{base}.packed", **{k: f"{base}.{k}" for k in BNB_KEYS}}
        if keys[""] not in state_dict:
            missing_keys.append(base)
            return
        try:
            other = NF4Weight.from_bnb_tensors({k: state_dict[v] for k, v in keys.items() if v in state_dict},
                                               self.dtype, base)
        except CheckpointError as e:
            error_msgs.append(str(e))
            return
        if other.shape != self.shape:
            error_msgs.append(f"{base}: NF4 shape {tuple(other.shape)} != {tuple(self.shape)}")
            return
        with torch.no_grad():
            for name, buf in other.named_buffers():
                self.register_buffer(name, buf.to(self.device))
        self.blocksize, self.nested_blocksize = other.blocksize, other.nested_blocksize
        self.double_quant = other.double_quant
        if not self.double_quant:
            for name in ("nested_absmax", "nested_quant_map", "offset"):
                self._buffers.pop(name, None)


def _nearest(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest entry of the sorted ``code``; a value exactly between two entries takes the lower."""
    return torch.bucketize(scaled, (code[:-1] + code[1:]) / 2)


def _quantize_blocks(flat: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-value code indices as uint8, fp32 absmax per block) for a 1-D tensor; the last block may be short."""
    n = flat.numel()
    blocks = -(-n // blocksize)
    absmax = torch.empty(blocks, dtype=torch.float32, device=flat.device)
    idx = torch.empty(n, dtype=torch.uint8, device=flat.device)
    step = max(blocksize, _CHUNK // blocksize * blocksize)
    for start in range(0, n, step):
        x = flat[start:start + step].float()
        m = x.numel()
        full = m // blocksize * blocksize
        b0 = start // blocksize
        parts = []
        if full:
            xb = x[:full].view(-1, blocksize)
            am = xb.abs().amax(dim=1)
            absmax[b0:b0 + full // blocksize] = am
            parts.append((xb * (1.0 / am.clamp(min=_TINY)).unsqueeze(1)).reshape(-1))
        if m > full:
            am = x[full:].abs().amax()
            absmax[-1] = am
            parts.append(x[full:] * (1.0 / am.clamp(min=_TINY)))
        scaled = torch.cat(parts).clamp_(-1, 1) if len(parts) > 1 else parts[0].clamp_(-1, 1)
        idx[start:start + m] = _nearest(scaled, code).to(torch.uint8)
    return idx, absmax


@torch.no_grad()
def quantize_nf4(weight: torch.Tensor, blocksize: int = 64, compress_statistics: bool = True,
                 dtype: torch.dtype | None = None) -> NF4Weight:
    """Quantize a weight (any float dtype, on any device) to NF4 in bitsandbytes' layout.

    ``dtype`` is the compute dtype of the result (default: ``weight.dtype``). Values are scaled by the
    reciprocal of their block's absmax and rounded to the nearest NF4 level; with ``compress_statistics`` the
    absmax vector is double-quantized (mean offset, 8-bit dynamic map, blocks of 256).
    """
    if not weight.is_floating_point():
        raise ValueError(f"quantize_nf4 needs a floating-point weight, got {weight.dtype}")
    code = nf4_code(weight.device)
    idx, absmax = _quantize_blocks(weight.detach().reshape(-1), code, blocksize)
    if idx.numel() % 2:
        idx = torch.cat([idx, idx.new_full((1,), 7)])  # pad with the zero level (index 7)
    packed = (idx[0::2] << 4) | idx[1::2]
    dtype = dtype or weight.dtype
    if not compress_statistics:
        return NF4Weight(packed, absmax, weight.shape, dtype, blocksize, code)
    offset = absmax.mean()
    nmap = dynamic_map().to(weight.device)
    qabs, nested_absmax = _quantize_blocks(absmax - offset, nmap, 256)
    return NF4Weight(packed, qabs, weight.shape, dtype, blocksize, code, nested_absmax, nmap, offset, 256)


def dequantize_nf4_reference(w: NF4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Plain PyTorch dequantization: ``code[q] * absmax`` in fp32, rounded once to ``dtype``."""
    n, bs = w.numel(), w.blocksize
    idx = torch.arange(256, device=w.device)
    pairs = w.code()[torch.stack([idx >> 4, idx & 15], dim=1)]  # [256, 2]: the two levels of every byte value
    vals = pairs.index_select(0, w.packed.int()).reshape(-1)
    absmax = w.block_absmax()
    vals = torch.nn.functional.pad(vals, (0, absmax.numel() * bs - vals.numel()))  # whole blocks
    return (vals.view(-1, bs) * absmax.unsqueeze(1)).reshape(-1)[:n].to(dtype or w.dtype).reshape(w.shape)
