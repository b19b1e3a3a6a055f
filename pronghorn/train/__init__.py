"""Training layer: the native SFT loop, its settings, schedules, checkpoints and metrics."""

from .config import TrainConfig
from .run import train
from .trainer import Trainer, TrainResult

__all__ = ["TrainConfig", "TrainResult", "Trainer", "train"]
