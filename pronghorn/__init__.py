"""pronghorn: fast, exact LoRA fine-tuning of Llama-family models."""

from .api import FastLanguageModel, FastModel
from .causal_lm import PronghornForCausalLM
from .errors import CheckpointError, DataError, OutputExistsError, PronghornError, UnsupportedModelError
from .models.precision import is_bfloat16_supported
from .models.vocab import add_new_tokens
from .train.config import TrainConfig
from .train.grpo_trainer import GRPOTrainer
from .train.evaluate import evaluate_perplexity
from .train.run import train

__version__ = "0.1.0"
__all__ = ["CheckpointError", "DataError", "FastLanguageModel", "FastModel", "GRPOTrainer", "OutputExistsError",
           "PronghornError", "PronghornForCausalLM", "PronghornTrainer", "PronghornTrainingArguments", "TrainConfig",
           "UnsupportedModelError", "add_new_tokens", "evaluate_perplexity", "is_bfloat16_supported", "train"]


def __getattr__(name: str):
    """TRL-based classes, imported on first use (trl is optional)."""
    if name in ("PronghornTrainer", "PronghornTrainingArguments"):
        from .train import trl_trainer

        return getattr(trl_trainer, name)
    raise AttributeError(f"module 'pronghorn' has no attribute {name!r}")
