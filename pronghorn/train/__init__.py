"""Training layer: the native SFT loop, its settings, schedules, checkpoints and metrics."""

from .bf16_adamw import BF16AdamW
from .config import TrainConfig
from .run import train
from .trainer import Trainer, TrainResult

__all__ = ["BF16AdamW", "TrainConfig", "TrainResult", "Trainer", "train"]
