"""Training layer: the native trainers (SFT, DPO / ORPO / KTO, GRPO), the method table, one ``prepare`` path for
every method, settings, schedules, checkpoints and metrics."""

from .bf16_adamw import BF16AdamW
from .config import TrainConfig
from .grpo_trainer import GRPOTrainer
from .methods import METHODS, Method
from .run import Prepared, prepare, train
from .trainer import Trainer, TrainResult

__all__ = ["BF16AdamW", "GRPOTrainer", "METHODS", "Method", "Prepared", "TrainConfig", "TrainResult", "Trainer",
           "prepare", "train"]
