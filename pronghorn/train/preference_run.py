"""``pronghorn.train(method="dpo" | "orpo" | "kto", ...)``: load, attach LoRA, tokenize pairs, train, save."""

from __future__ import annotations

import torch

from ..data.preference import load_preference_records, tokenize_kto, tokenize_preference
from ..errors import PronghornError
from ..export.adapter import MODEL_FILES
from ..files import check_output_dir
from ..models.loader import load_pretrained
from ..models.lora import LoRAConfig, attach_lora, trainable_parameters
from .config import TrainConfig
from .preference_trainer import PreferenceTrainer
from .trainer import TrainResult


def train_preference(cfg: TrainConfig) -> TrainResult:
    """Preference fine-tuning with LoRA; the reference is the base model (adapters disabled)."""
    if cfg.data is None or cfg.data == "demo":
        raise PronghornError(f"method={cfg.method!r} needs a preference dataset file (prompt/chosen/rejected, "
                             "hh-rlhf .jsonl.gz, ShareGPT dpo, OpenAssistant trees; KTO: completion + label)")
    if not cfg.resume_from_checkpoint:
        check_output_dir(cfg.output_dir, cfg.overwrite, marker_files=MODEL_FILES + ("metrics.jsonl",))
    records = load_preference_records(cfg.data)
    from .run import parse_dtype  # run.py dispatches here; imported late to keep the import graph one-way

    loaded = load_pretrained(cfg.model, parse_dtype(cfg.dtype), cfg.device, load_in_4bit=cfg.load_in_4bit)
    model, tokenizer = loaded.model, loaded.tokenizer
    tokenize = tokenize_kto if cfg.method == "kto" else tokenize_preference
    rows = tokenize(records, tokenizer, cfg.max_length, cfg.max_prompt_length, skip_bad_rows=cfg.skip_bad_rows)
    attach_lora(model, LoRAConfig(r=cfg.r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                  target_modules=cfg.target_modules, use_rslora=cfg.use_rslora), seed=cfg.seed)
    model.gradient_checkpointing_enable(mode=cfg.gradient_checkpointing,  # auto | on | offload | off
                                        tiled_mlp=cfg.tiled_mlp, tiled_mlp_chunk=cfg.tiled_mlp_chunk,
                                        max_memory=cfg.max_memory or "none")
    trainable, total = trainable_parameters(model)
    skipped = f" ({len(rows.skipped)} bad rows skipped)" if rows.skipped else ""
    print(f"pronghorn {cfg.method}: {loaded.base_name} on {model.device} ({model.dtype}), {len(rows)} rows{skipped}, "
          f"LoRA r={cfg.r}: {trainable:,} of {total:,} parameters train")
    torch.manual_seed(cfg.seed)
    return PreferenceTrainer(model, tokenizer, rows, cfg, loaded.base_name).train()
