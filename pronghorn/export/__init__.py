"""Export layer: PEFT adapters and merged Hugging Face checkpoints (GGUF and Ollama come with issue 6)."""

from .adapter import save_adapter
from .merged import merged_state_dict, save_merged

__all__ = ["merged_state_dict", "save_adapter", "save_merged"]
