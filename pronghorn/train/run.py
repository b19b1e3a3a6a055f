"""``pronghorn.train(...)``: load a model, attach LoRA, tokenize the data, train, save — one call."""

from __future__ import annotations

import dataclasses

import torch

from ..data import load_records, tokenize_dataset
from ..data.demo import identity_dataset
from ..errors import PronghornError
from ..export.adapter import MODEL_FILES
from ..files import check_output_dir
from ..models.loader import load_pretrained
from ..models.lora import trainable_parameters
from .config import TrainConfig
from .distributed import failure_guard, init_distributed, load_placement
from .full_finetune import make_trainable
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


def train(config: TrainConfig | None = None, **overrides) -> TrainResult:
    """Fine-tune with LoRA as ``config`` (or keyword settings, the fields of TrainConfig) says.

    ``data="demo"`` uses the embedded persona dataset. Writes the PEFT adapter, tokenizer, metrics.jsonl
    and loss.png into ``output_dir``.
    """
    cfg = dataclasses.replace(config, **overrides) if config is not None else TrainConfig(**overrides)
    if cfg.method != "sft":  # DPO / ORPO / KTO (train/preference_run.py)
        from .preference_run import train_preference

        return train_preference(cfg)
    if cfg.data is None:
        raise PronghornError("no training data given (a .json/.jsonl file, or 'demo')")
    if not cfg.resume_from_checkpoint:  # fail before the slow load, not after
        check_output_dir(cfg.output_dir, cfg.overwrite, marker_files=MODEL_FILES + ("metrics.jsonl",))
    records = identity_dataset() if cfg.data == "demo" else load_records(cfg.data)
    env = init_distributed(cfg.distributed_timeout_s)  # under torchrun / accelerate launch: join the job
    device, dtype = load_placement(cfg.distributed, env, cfg.device, parse_dtype(cfg.dtype))
    loaded = load_pretrained(cfg.model, dtype, device, load_in_4bit=cfg.load_in_4bit)
    model, tokenizer = loaded.model, loaded.tokenizer
    examples = tokenize_dataset(records, tokenizer, cfg.data_format, cfg.max_length, train_on=cfg.train_on,
                                progress=cfg.progress and env.is_main, truncation_mode=cfg.truncation_mode,
                                overlong=cfg.overlong, skip_bad_rows=cfg.skip_bad_rows)
    trains = make_trainable(model, cfg)  # LoRA adapters, or every weight (full_finetuning): train/full_finetune.py
    model.gradient_checkpointing_enable(mode=cfg.gradient_checkpointing,  # auto | on | offload | off
                                        tiled_mlp=cfg.tiled_mlp, tiled_mlp_chunk=cfg.tiled_mlp_chunk,
                                        max_memory=cfg.max_memory or "none")
    if cfg.neftune_noise_alpha:
        activate_neftune(model, cfg.neftune_noise_alpha)
    trainable, total = trainable_parameters(model)
    if env.is_main:
        print(f"pronghorn: {loaded.base_name} on {model.device} ({model.dtype}), {len(examples)} examples, "
              f"{trains}: {trainable:,} of {total:,} parameters "
              f"train" + (f", {env.world_size} ranks ({cfg.distributed})" if env.distributed else ""))
    torch.manual_seed(cfg.seed + env.rank)  # LoRA dropout masks differ per rank; the adapter init does not
    with failure_guard(env, cfg.output_dir):
        return Trainer(model, tokenizer, examples, cfg, loaded.base_name).train()
