"""Model layer: config normalisation, the decoder, LoRA, and checkpoint loading (HF dirs, GGUF, adapters)."""

from .adapter_format import load_adapter
from .builder import build_model, init_random_model
from .config import ModelConfig
from .decoder import DecoderForCausalLM
from .default_model import default_model_dir
from .gguf_loading import read_gguf
from .kv_cache import KVCache
from .loader import load_pretrained
from .lora import LoRAConfig, attach_lora, merge_lora, set_lora_enabled

__all__ = ["DecoderForCausalLM", "KVCache", "LoRAConfig", "ModelConfig", "attach_lora", "build_model",
           "default_model_dir", "init_random_model", "load_adapter", "load_pretrained", "merge_lora", "read_gguf",
           "set_lora_enabled"]
