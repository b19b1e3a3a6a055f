"""The training methods ``pronghorn train --method`` knows: for each, how its data is read and tokenized and
which trainer runs it. :func:`pronghorn.train.run.prepare` does everything else (distributed launch, loading,
LoRA, checkpointing, NEFTune, the trainer's metrics, checkpoints and resume) the same way for every method.

Adding a method is one entry here: a :class:`Method` with its record reader, tokenizer and trainer class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ..data import load_records, tokenize_dataset
from ..data.demo import identity_dataset
from ..data.preference import load_preference_records, tokenize_kto, tokenize_preference
from ..data.prompts import prompt_rows
from ..errors import PronghornError
from .config import TrainConfig
from .grpo_rewards import resolve_rewards
from .grpo_trainer import GRPOTrainer
from .preference_trainer import PreferenceTrainer
from .trainer import Trainer


@dataclass(frozen=True)
class Method:
    name: str
    read: Callable[[TrainConfig], list]  # cfg.data -> records (before the model loads: bad files fail fast)
    tokenize: Callable[[list, Any, TrainConfig, bool], list]  # (records, tokenizer, cfg, show progress) -> rows
    trainer: type[Trainer]
    rows_are: str  # what the printed count counts
    neftune: bool = False  # NEFTune's embedding noise applies (instruction tuning only)


def _sft_records(cfg: TrainConfig) -> list:
    if cfg.data is None:
        raise PronghornError("no training data given (a .json/.jsonl file, or 'demo')")
    return identity_dataset() if cfg.data == "demo" else load_records(cfg.data, sample_by=cfg.sample_by)


def _sft_rows(records: list, tokenizer, cfg: TrainConfig, progress: bool) -> list:
    return tokenize_dataset(records, tokenizer, cfg.data_format, cfg.max_length, train_on=cfg.train_on,
                            progress=progress, truncation_mode=cfg.truncation_mode, overlong=cfg.overlong,
                            skip_bad_rows=cfg.skip_bad_rows)


def _preference_records(cfg: TrainConfig) -> list:
    if cfg.data is None or cfg.data == "demo":
        raise PronghornError(f"method={cfg.method!r} needs a preference dataset file (prompt/chosen/rejected, "
                             "hh-rlhf .jsonl.gz, ShareGPT dpo, OpenAssistant trees; KTO: completion + label)")
    return load_preference_records(cfg.data)


def _pair_rows(records: list, tokenizer, cfg: TrainConfig, progress: bool) -> list:
    return tokenize_preference(records, tokenizer, cfg.max_length, cfg.max_prompt_length,
                               skip_bad_rows=cfg.skip_bad_rows)


def _kto_rows(records: list, tokenizer, cfg: TrainConfig, progress: bool) -> list:
    return tokenize_kto(records, tokenizer, cfg.max_length, cfg.max_prompt_length, skip_bad_rows=cfg.skip_bad_rows)


def _prompt_records(cfg: TrainConfig) -> list:
    if cfg.data is None or cfg.data == "demo":
        raise PronghornError("method='grpo' needs a prompt dataset file ({'prompt': str or messages, ...} rows, or "
                             "gsm8k's question / answer rows)")
    resolve_rewards(cfg.reward_funcs, cfg.reward_weights)  # a bad reward name fails before the model loads
    return load_records(cfg.data)


def _prompt_rows(records: list, tokenizer, cfg: TrainConfig, progress: bool) -> list:
    return prompt_rows(records, tokenizer, cfg.max_prompt_length)


METHODS: dict[str, Method] = {
    "sft": Method("sft", _sft_records, _sft_rows, Trainer, "examples", neftune=True),
    "dpo": Method("dpo", _preference_records, _pair_rows, PreferenceTrainer, "pairs"),
    "orpo": Method("orpo", _preference_records, _pair_rows, PreferenceTrainer, "pairs"),
    "kto": Method("kto", _preference_records, _kto_rows, PreferenceTrainer, "rows"),
    "grpo": Method("grpo", _prompt_records, _prompt_rows, GRPOTrainer, "prompts"),
}


def get_method(cfg: TrainConfig) -> Method:
    """The table entry for ``cfg.method``, or a PronghornError listing the methods; settings that do not apply
    to it are refused here, before anything loads."""
    method = METHODS.get(cfg.method)
    if method is None:
        raise PronghornError(f"method {cfg.method!r} is not one of {', '.join(METHODS)}")
    if cfg.neftune_noise_alpha and not method.neftune:
        raise PronghornError(f"neftune_noise_alpha applies to method='sft' only (instruction tuning); "
                             f"method={cfg.method!r} would add the noise to its reference forward too")
    return method
