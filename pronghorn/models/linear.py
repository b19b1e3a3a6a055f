"""The projection layer every attention/MLP matrix uses: a frozen base weight plus an optional LoRA adapter.

Parameter names match Hugging Face (``weight``, ``bias``) so checkpoints load 1:1; the adapter adds
``lora_A`` [r, in] and ``lora_B`` [out, r], which map to PEFT's ``lora_A.weight`` / ``lora_B.weight``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..kernels import lora_linear
from ..kernels.nf4 import NF4Weight, quantize_nf4
from ..kernels.policy import DEFAULT_POLICY, KernelPolicy


class Linear(nn.Module):
    kernel_policy: KernelPolicy = DEFAULT_POLICY  # kernels/policy.py; DecoderForCausalLM.set_kernel_policy

    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype=None, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        self.lora_A: nn.Parameter | None = None
        self.lora_B: nn.Parameter | None = None
        self.lora_scaling = 0.0
        self.lora_dropout = 0.0
        self.lora_enabled = True

    @property
    def has_lora(self) -> bool:
        return self.lora_A is not None

    def add_lora(
        self, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
        generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32,
    ) -> None:
        """Attach a fresh adapter initialised as PEFT does: A Kaiming-uniform(a=sqrt 5), B zero."""
        device = self.weight.device
        a = torch.empty(r, self.in_features, dtype=torch.float32)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        self.lora_A = nn.Parameter(a.to(device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=device, dtype=dtype))
        self.lora_scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.lora_dropout = dropout

    def remove_lora(self) -> None:
        self.lora_A = self.lora_B = None

    @property
    def is_quantized(self) -> bool:
        return isinstance(self.weight, NF4Weight)

    def quantize_nf4(self, blocksize: int = 64, compress_statistics: bool = True) -> None:
        """Store the base weight as NF4 (bitsandbytes layout, QLoRA); compute stays in the weight's dtype."""
        if not self.is_quantized:
            self.use_nf4(quantize_nf4(self.weight.detach(), blocksize, compress_statistics))

    def use_nf4(self, weight: NF4Weight) -> None:
        """Replace the base weight by an already quantized one (e.g. read from a bnb-4bit checkpoint)."""
        if weight.shape != (self.out_features, self.in_features):
            raise ValueError(f"NF4 weight {tuple(weight.shape)} for a [{self.out_features}, {self.in_features}] layer")
        del self.weight
        self.weight = weight

    def dense_weight(self) -> torch.Tensor:
        """The base weight as a plain tensor (dequantized when stored as NF4), e.g. for export."""
        return self.weight.dequantize() if self.is_quantized else self.weight

    @torch.no_grad()
    def merge_lora(self) -> None:
        """Fold the adapter into the base weight (W += s * B A) and drop it. An NF4 base is dequantized first
        and stays dense (re-quantizing would round the merged weight again)."""
        if self.has_lora:
            if self.is_quantized:
                self.weight = nn.Parameter(self.dense_weight(), requires_grad=False)
            delta = (self.lora_B.float() @ self.lora_A.float()) * self.lora_scaling
            self.weight.copy_((self.weight.float() + delta.to(self.weight.device)).to(self.weight.dtype))
            self.remove_lora()

    def _load_from_state_dict(self, state_dict, prefix, *args):
        if self.is_quantized and prefix + "weight" in state_dict:  # bitsandbytes' name for the packed NF4 data
            state_dict[prefix + "weight.packed"] = state_dict.pop(prefix + "weight")
        super()._load_from_state_dict(state_dict, prefix, *args)

    def forward(self, x: torch.Tensor, output_unused: bool = False, owns_input: bool = False) -> torch.Tensor:
        """``output_unused``: the caller throws the values away (kernels.lora_linear: the fast path skips the
        base matmul); ``owns_input``: nothing else uses ``x`` (the fast path's backward may overwrite it)."""
        if self.lora_A is None or not self.lora_enabled:
            return lora_linear(x, self.weight, self.bias, None, None, 0.0)
        return lora_linear(x, self.weight, self.bias, self.lora_A, self.lora_B, self.lora_scaling,
                           self.lora_dropout, self.training, output_unused, owns_input, self.kernel_policy)

    def extra_repr(self) -> str:
        r = f", lora_r={self.lora_A.shape[0]}" if self.has_lora else ""
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}{r}"
