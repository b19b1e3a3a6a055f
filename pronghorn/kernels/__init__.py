"""Hot ops, each a plain PyTorch reference plus a Triton kernel (CUDA) behind one function; which one runs is
decided by the tensors' device and the caller's kernel policy (``policy.py``)."""

from .geglu import geglu
from .linear_cross_entropy import IGNORE_INDEX, linear_cross_entropy
from .linear_logprobs import linear_logprobs
from .lora_linear import LoRAProjection, fusable_projections, lora_linear
from .lora_mlp import lora_mlp
from .lora_qkv import lora_qkv
from .rmsnorm import rms_norm, rms_norm_with_residual
from .rope import apply_rope, rope_cos_sin
from .softcapped_attention import softcapped_attention
from .swiglu import swiglu

__all__ = [
    "IGNORE_INDEX", "LoRAProjection", "apply_rope", "fusable_projections", "geglu", "linear_cross_entropy", "linear_logprobs",
    "lora_linear",
    "lora_mlp", "lora_qkv", "rms_norm", "rms_norm_with_residual", "rope_cos_sin", "softcapped_attention", "swiglu",
]
