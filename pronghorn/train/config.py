"""Training settings as one dataclass; YAML recipes and CLI flags map 1:1 onto its fields."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from ..errors import PronghornError
from ..models.lora import ALL_TARGETS


@dataclass
class TrainConfig:
    # what to train on
    model: str = "default"
    data: str | None = None
    output_dir: str = "outputs/run"
    overwrite: bool = False
    data_format: str | None = None  # text | prompt_completion | messages; None = detect
    train_on: str = "all_assistant"  # or last_assistant
    max_length: int = 2048
    # optimisation
    max_steps: int | None = None  # overrides num_epochs when set
    num_epochs: float = 1.0
    batch_size: int = 2
    gradient_accumulation_steps: int = 4
    learning_rate: float = 2e-4
    lr_scheduler: str = "linear"  # linear | cosine | constant
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    seed: int = 3407
    # LoRA
    r: int = 16
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(ALL_TARGETS))
    use_rslora: bool = False
    # runtime
    dtype: str | None = None  # float32 | bfloat16 | float16; None = bf16 on GPU, fp32 on CPU
    device: str | None = None
    gradient_checkpointing: bool = False
    logging_steps: int = 1
    save_steps: int | None = None  # adapter checkpoints every N steps (None = only at the end)
    save_total_limit: int | None = 2
    resume_from_checkpoint: str | None = None  # a checkpoint dir, or "latest" in output_dir
    progress: bool = True

    def __post_init__(self):
        if self.lr_scheduler not in ("linear", "cosine", "constant"):
            raise PronghornError(f"lr_scheduler must be linear, cosine or constant, got {self.lr_scheduler!r}")
        for name in ("batch_size", "gradient_accumulation_steps", "max_length", "r"):
            if getattr(self, name) < 1:
                raise PronghornError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise PronghornError(f"max_steps must be at least 1, got {self.max_steps}")

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> "TrainConfig":
        path = Path(path)
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except FileNotFoundError:
            raise PronghornError(f"{path}: recipe file not found") from None
        except yaml.YAMLError as e:
            raise PronghornError(f"{path}: not valid YAML ({e})") from None
        if not isinstance(raw, dict):
            raise PronghornError(f"{path}: a recipe must be a mapping of setting: value")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise PronghornError(f"{path}: unknown setting(s) {unknown}; known: {sorted(known)}")
        raw.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**raw)
