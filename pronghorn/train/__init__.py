"""Training layer: the native trainers (SFT, DPO / ORPO / KTO), the method table, one ``prepare`` path for
every method, settings, schedules, checkpoints and metrics."""

from .config import TrainConfig
from .methods import METHODS, Method
from .run import Prepared, prepare, train
from .trainer import Trainer, TrainResult

__all__ = ["METHODS", "Method", "Prepared", "TrainConfig", "TrainResult", "Trainer", "prepare", "train"]
