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
from ..models.lora import LoRAConfig, attach_lora, trainable_parameters
from .config import TrainConfig
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
    if cfg.data is None:
        raise PronghornError("no training data given (a .json/.jsonl file, or 'demo')")
    if not cfg.resume_from_checkpoint:  # fail before the slow load, not after
        check_output_dir(cfg.output_dir, cfg.overwrite, marker_files=MODEL_FILES + ("metrics.jsonl",))
    records = identity_dataset() if cfg.data == "demo" else load_records(cfg.data)
    loaded = load_pretrained(cfg.model, parse_dtype(cfg.dtype), cfg.device)
    model, tokenizer = loaded.model, loaded.tokenizer
    examples = tokenize_dataset(records, tokenizer, cfg.data_format, cfg.max_length, train_on=cfg.train_on,
                                progress=cfg.progress)
    attach_lora(model, LoRAConfig(r=cfg.r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                  target_modules=cfg.target_modules, use_rslora=cfg.use_rslora), seed=cfg.seed)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    trainable, total = trainable_parameters(model)
    print(f"pronghorn: {loaded.base_name} on {model.device} ({model.dtype}), {len(examples)} examples, "
          f"LoRA r={cfg.r} on {len(cfg.target_modules)} module kinds: {trainable:,} of {total:,} parameters train")
    torch.manual_seed(cfg.seed)
    return Trainer(model, tokenizer, examples, cfg, loaded.base_name).train()
