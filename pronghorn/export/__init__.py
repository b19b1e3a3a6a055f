"""Export layer: PEFT adapters, merged Hugging Face checkpoints, GGUF files and Ollama Modelfiles."""

from .adapter import save_adapter
from .gguf_writer import save_gguf
from .merged import iter_merged, merged_state_dict, save_merged
from .ollama import ollama_modelfile
from .save import save_pretrained_gguf, save_pretrained_merged

__all__ = ["iter_merged", "merged_state_dict", "ollama_modelfile", "save_adapter", "save_gguf", "save_merged",
           "save_pretrained_gguf", "save_pretrained_merged"]
