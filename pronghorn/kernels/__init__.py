"""Hot ops, each a plain PyTorch reference plus (later) a Triton kernel, behind one function."""

from .geglu import geglu
from .linear_cross_entropy import IGNORE_INDEX, linear_cross_entropy
from .lora_linear import lora_linear
from .rmsnorm import rms_norm
from .rope import apply_rope, rope_cos_sin
from .swiglu import swiglu

__all__ = [
    "IGNORE_INDEX", "apply_rope", "geglu", "linear_cross_entropy", "lora_linear", "rms_norm", "rope_cos_sin", "swiglu",
]
