"""``pronghorn.train(...)``: load a model, attach LoRA, tokenize the data, train, save — one call, every method.

:func:`prepare` is the one path every method (train/methods.py) goes through: join a torchrun / accelerate
job, check the output directory, read the data, load the model on this rank's device, tokenize, attach LoRA,
set gradient checkpointing and the memory budget, NEFTune where it applies, and build the method's trainer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import PronghornError
from ..export.adapter import MODEL_FILES
from ..files import check_output_dir
from ..models.loader import load_pretrained
from ..models.lora import trainable_parameters
from .config import TrainConfig
from .distributed import DistEnv, failure_guard, init_distributed, load_placement
from .full_finetune import make_trainable
from .methods import get_method
from .neftune import activate_neftune
from .trainer import Trainer, TrainResult

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    try:
        return _DTYPES[name]
    except KeyError:
        raise PronghornError(f"dtype {name!r} is not one of {sorted(_DTYPES)}") from None


@dataclass
class Prepared:
    """A run ready to start: ``trainer.train()`` inside ``failure_guard(env, ...)`` (what :func:`train` does)."""
    trainer: Trainer
    env: DistEnv


def prepare(cfg: TrainConfig) -> Prepared:
    """Everything before the first step, the same for every method (see the module docstring)."""
    method = get_method(cfg)
    if not cfg.resume_from_checkpoint:  # fail before the slow load, not after
        check_output_dir(cfg.output_dir, cfg.overwrite, marker_files=MODEL_FILES + ("metrics.jsonl",))
    records = method.read(cfg)
    env = init_distributed(cfg.distributed_timeout_s)  # under torchrun / accelerate launch: join the job
    device, dtype = load_placement(cfg.distributed, env, cfg.device, parse_dtype(cfg.dtype))
    loaded = load_pretrained(cfg.model, dtype, device, load_in_4bit=cfg.load_in_4bit)
    model, tokenizer = loaded.model, loaded.tokenizer
    rows = method.tokenize(records, tokenizer, cfg, cfg.progress and env.is_main)
    trains = make_trainable(model, cfg)  # LoRA adapters, or every weight (full_finetuning): train/full_finetune.py
    model.gradient_checkpointing_enable(mode=cfg.gradient_checkpointing,  # auto | on | offload | off
                                        tiled_mlp=cfg.tiled_mlp, tiled_mlp_chunk=cfg.tiled_mlp_chunk,
                                        max_memory=cfg.max_memory or "none")
    if cfg.neftune_noise_alpha:
        activate_neftune(model, cfg.neftune_noise_alpha)
    trainable, total = trainable_parameters(model)
    if env.is_main:
        skipped = getattr(rows, "skipped", None)
        print(f"pronghorn {cfg.method}: {loaded.base_name} on {model.device} ({model.dtype}), {len(rows)} "
              f"{method.rows_are}" + (f" ({len(skipped)} bad rows skipped)" if skipped else "")
              + f", {trains}: {trainable:,} of {total:,} parameters "
              f"train" + (f", {env.world_size} ranks ({cfg.distributed})" if env.distributed else ""))
    torch.manual_seed(cfg.seed + env.rank)  # LoRA dropout masks differ per rank; the adapter init does not
    return Prepared(method.trainer(model, tokenizer, rows, cfg, loaded.base_name), env)


def train(config: TrainConfig | None = None, **overrides) -> TrainResult:
    """Fine-tune with LoRA as ``config`` (or keyword settings, the fields of TrainConfig) says: SFT, or
    ``method="dpo" | "orpo" | "kto"`` on preference data.

    ``data="demo"`` uses the embedded persona dataset. Writes the PEFT adapter, tokenizer, metrics.jsonl
    and loss.png into ``output_dir``. Under torchrun / accelerate launch every method trains data-parallel.
    """
    cfg = config.replace(**overrides) if config is not None else TrainConfig(**overrides)
    run = prepare(cfg)
    with failure_guard(run.env, cfg.output_dir):
        return run.trainer.train()
