"""Training settings as one dataclass; YAML recipes and CLI flags map 1:1 onto its fields."""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass, field, fields
from dataclasses import replace as replace_fields
from pathlib import Path
from typing import Any

import yaml

from ..errors import PronghornError, cli_flag, spell
from ..models.memory_plan import parse_budget
from ..models.recompute import checkpoint_mode
from ..models.lora import ALL_TARGETS
from ..models.tiled_mlp import tiled_mlp_mode
from .full_finetune import check_settings as check_full_finetuning
from .optimizers import optimizer_name
from .report import check_report_to
from .grpo_settings import check_generation_batch, method_defaults, resolve_method_defaults, scale_rewards_mode
from .settings import check


@dataclass
class TrainConfig:
    # what to train on
    model: str = "default"
    data: str | None = None
    output_dir: str = "outputs/run"
    overwrite: bool = False
    data_format: str | None = None  # text | raw_text | prompt_completion | messages | ...; None = detect
    sample_by: str = "line"  # .txt files: a row (document) per line | paragraph | document (the whole file)
    train_on: str = "all_assistant"  # or last_assistant
    max_length: int = 2048
    # optimisation
    max_steps: int | None = None  # overrides num_epochs when set
    num_epochs: float = 1.0
    batch_size: int = 2
    gradient_accumulation_steps: int = 4
    learning_rate: float = 2e-4
    embedding_learning_rate: float | None = None  # embed_tokens / lm_head in target_modules (None: learning_rate)
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
    logging_steps: int = 1
    report_to: str = "none"  # none | tensorboard | wandb (offline), besides metrics.jsonl and loss.png
    save_steps: int | None = None  # adapter checkpoints every N steps (None = only at the end)
    save_total_limit: int | None = 2
    resume_from_checkpoint: str | None = None  # a checkpoint dir, or "latest" in output_dir
    progress: bool = True
    # memory and speed (models/memory_plan.py, models/recompute.py, train/optimizers.py, data/packing.py)
    max_memory: str | int | None = None  # the step's memory budget, e.g. "16GiB" (None: what the GPU gives)
    gradient_checkpointing: str | bool = "auto"  # auto | on (true) | offload ("unsloth") | off (false)
    tiled_mlp: str | bool = "auto"  # auto | on | off: norm + MLP over chunks of tokens (models/tiled_mlp.py)
    tiled_mlp_chunk: int = 8192  # tokens per chunk of the tiled MLP
    optim: str = "adamw_torch_fused"  # adamw_torch | adamw_torch_fused | adamw_8bit (bitsandbytes, GPU)
    load_in_4bit: bool = False  # QLoRA: the base's projections stored as NF4
    packing: bool = False  # padding-free rows of <= max_length tokens (batch_size counts rows); positions restart
    # multi-GPU, when launched by torchrun / accelerate launch (a single process ignores these); docs/multi_gpu.md
    distributed: str = "auto"  # auto (LoRA: ddp, full fine-tuning: fsdp) | ddp | fsdp
    distributed_timeout_s: float = 1800.0  # a collective waiting longer (a dead or stuck rank) ends every rank
    # preference training (pronghorn.train.preference_trainer); names as TRL's DPOConfig / KTOConfig / ORPOConfig
    method: str = "sft"  # sft | dpo | orpo | kto | grpo
    beta: float | None = None  # None: 0.1 (dpo, orpo, kto) or 0.0 (grpo: no reference forward), as TRL
    loss_type: str | None = None  # dpo: sigmoid (default) | ipo | hinge | robust | simpo; grpo: dapo (default) | grpo | dr_grpo
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    max_prompt_length: int | None = None  # longer prompts keep their end
    desirable_weight: float = 1.0  # kto
    undesirable_weight: float = 1.0  # kto
    precompute_ref_log_probs: bool = False
    skip_bad_rows: bool = False  # drop (and count) bad preference rows instead of stopping
    # SFT data pipeline (pronghorn.data; skip_bad_rows above applies to SFT rows too) and NEFTune
    truncation_mode: str = "keep_start"  # keep_start | keep_end (rows longer than max_length)
    overlong: str = "truncate"  # truncate | split | drop | error
    neftune_noise_alpha: float | None = None  # NEFTune noise on the input embeddings while training (e.g. 5)
    # full fine-tuning on one device (train/full_finetune.py, train/step_in_backward.py)
    full_finetuning: bool = False  # every weight trains (no LoRA): bf16 weights on a GPU
    optimizer_in_backward: bool = False  # each weight steps in the backward pass: no full set of gradients
    # held-out evaluation (train/evaluate.py, train/held_out.py): eval_loss and eval_perplexity in metrics.jsonl
    eval_data: str | None = None  # a held-out dataset, tokenized as the training data
    eval_split: float | None = None  # or this fraction of the training rows (documents), drawn with seed
    eval_steps: int | None = None  # evaluate every N optimizer steps (and after the last; None: after the last only)
    eval_batch_size: int | None = None  # rows per evaluation batch (None: batch_size)
    eval_on_start: bool = False  # also evaluate before the first step (logged as step 0)
    # GRPO (pronghorn.train.grpo_trainer); names and defaults as TRL's GRPOConfig (beta, loss_type: above).
    # A step trains on batch_size * gradient_accumulation_steps completions: num_generations per prompt; one
    # generation batch holds batch_size * steps_per_generation of them
    num_generations: int = 8
    max_completion_length: int = 256
    steps_per_generation: int | None = None  # None: gradient_accumulation_steps (or from generation_batch_size)
    generation_batch_size: int | None = None  # None: batch_size * steps_per_generation
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float = 0.0
    epsilon: float = 0.2
    epsilon_high: float | None = None  # None: epsilon
    scale_rewards: str | bool = "group"  # group (true) | batch | none (false)
    num_iterations: int = 1
    mask_truncated_completions: bool = False  # completions cut at max_completion_length carry no loss
    reward_funcs: list[str] = field(default_factory=list)  # built-in names or "module:function" (Python: callables)
    reward_weights: list[float] | None = None  # None: 1.0 each
    stop_strings: list[str] | None = None
    use_bias_correction_kl: bool = True  # the KL term times the probability ratio (TRL's default)

    def __post_init__(self):
        for name, normalise in (("gradient_checkpointing", checkpoint_mode), ("tiled_mlp", tiled_mlp_mode),
                                ("optim", optimizer_name), ("data_format", _data_format),
                                ("scale_rewards", scale_rewards_mode)):
            try:
                setattr(self, name, normalise(getattr(self, name)))
            except PronghornError as e:
                raise PronghornError(f"{e} (CLI: {cli_flag(name)})") from None
        check_report_to(self.report_to)  # a known reporter whose package is installed
        for f in fields(self):  # every word and number against train/settings.py, before anything slow
            check(f.name, getattr(self, f.name))
        _check_eval_settings(self)
        resolve_method_defaults(self)  # beta and loss_type per method (train/grpo_settings.py)
        check_generation_batch(self)  # GRPO: steps_per_generation / generation_batch_size against the batch
        try:
            parse_budget(self.max_memory)  # a clear error now, not after the model loads
        except PronghornError as e:
            raise PronghornError(f"{e} (CLI: {cli_flag('max_memory')})") from None
        check_full_finetuning(self)  # what full fine-tuning and the step in the backward cannot combine with

    def replace(self, **overrides: Any) -> "TrainConfig":
        """A copy with ``overrides``. A new ``method`` also gets its own ``beta`` / ``loss_type`` defaults (TRL's
        per trainer) where this config holds the old method's defaults and no override names them."""
        if overrides.get("method", self.method) != self.method:
            for name, value in method_defaults(self.method).items():
                if name not in overrides and getattr(self, name) == value:
                    overrides[name] = None
        return replace_fields(self, **overrides)

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
        hints = typing.get_type_hints(cls)
        raw = {k: _coerce(v, hints[k], f"{path}: setting {k!r}") for k, v in raw.items()}
        for k, v in raw.items():  # the file's own values first, so that an error names the file
            try:
                check(k, v)
            except PronghornError as e:
                raise PronghornError(f"{path}: {e}") from None
        raw.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**raw)


def _check_eval_settings(cfg: "TrainConfig") -> None:
    """Held-out evaluation needs one source of held-out rows, and SFT (the loss it reports); raw text trains
    with the SFT loop."""
    if cfg.eval_data and cfg.eval_split:
        raise PronghornError(f"give {spell('eval_data')} or {spell('eval_split')}, not both")
    wanted = [n for n in ("eval_steps", "eval_batch_size", "eval_on_start") if getattr(cfg, n)]
    if wanted and not (cfg.eval_data or cfg.eval_split):
        raise PronghornError(f"{spell(wanted[0])} is set but there is no held-out data; give {spell('eval_data')} "
                             f"(a dataset file) or {spell('eval_split')} (e.g. 0.05)")
    if cfg.data_format == "raw_text" and cfg.method != "sft":
        raise PronghornError(f"data_format='raw_text' (continued pretraining) trains the language-modelling loss; "
                             f"it does not work with method={cfg.method!r}")
    if (cfg.eval_data or cfg.eval_split) and cfg.method != "sft":
        raise PronghornError(f"held-out evaluation (eval_data / eval_split) reports the SFT loss; it does not "
                             f"work with method={cfg.method!r}")


def _data_format(name: str | None) -> str | None:
    if name is None:
        return None
    from ..data import check_format_name  # the package: every format registered (oasst, pre-tokenized rows)

    try:
        return check_format_name(name)
    except ValueError as e:
        raise PronghornError(str(e)) from None


def _coerce(value: Any, kind: Any, where: str) -> Any:
    """A YAML value as the field's type. PyYAML reads ``1e-4`` (no dot) as a string, so numbers are parsed here."""
    union = typing.get_origin(kind) in (typing.Union, types.UnionType)
    options = [a for a in typing.get_args(kind) if a is not type(None)] if union else [kind]
    if value is None:
        if union and type(None) in typing.get_args(kind):
            return None
        raise PronghornError(f"{where}: a value is required (got null)")
    if len(options) > 1:  # e.g. str | bool: the first type that takes the value
        for option in options:
            try:
                return _coerce(value, option, where)
            except PronghornError:
                pass
        raise PronghornError(f"{where}: expected {' or '.join(o.__name__ for o in options)}, got {value!r}")
    target = options[0]
    if typing.get_origin(target) is list:
        item = typing.get_args(target)[0]
        if item in (int, float):  # reward_weights: numbers, one or a list
            return [_coerce(v, item, where) for v in (value if isinstance(value, list) else [value])]
        if isinstance(value, str):
            return list(ALL_TARGETS) if value == "all-linear" else [value]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
        raise PronghornError(f"{where}: expected a list of names, got {value!r}")
    if target is bool:
        if isinstance(value, bool):
            return value
        raise PronghornError(f"{where}: expected true or false, got {value!r}")
    if target in (int, float) and not isinstance(value, bool):
        try:
            number = float(value) if isinstance(value, str) else value
            if isinstance(number, (int, float)):
                if target is float:
                    return float(number)
                if float(number).is_integer():
                    return int(number)
        except ValueError:
            pass
        raise PronghornError(f"{where}: expected {'an integer' if target is int else 'a number'}, got {value!r}")
    if target is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise PronghornError(f"{where}: expected {getattr(target, '__name__', target)}, got {value!r}")
