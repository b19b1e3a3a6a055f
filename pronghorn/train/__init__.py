"""Training layer: the native SFT loop, preference and GRPO trainers, settings, schedules, checkpoints, metrics."""

from .config import TrainConfig
from .grpo_trainer import GRPOTrainer
from .run import train
from .trainer import Trainer, TrainResult

__all__ = ["GRPOTrainer", "TrainConfig", "TrainResult", "Trainer", "train"]
