"""What each training setting means and which values it takes: one table that the config checks when it is built
(before any model loads), that the CLI prints as ``train --help`` and that the README's table of errors is
checked against. Each :class:`~pronghorn.train.config.TrainConfig` field has exactly one entry."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import PronghornError, spell


@dataclass(frozen=True)
class Setting:
    """A setting's help text and its allowed values: ``choices`` for words, a range for numbers
    (``low`` / ``high`` bounds, each inclusive unless ``*_open``; ``None``: unbounded; ``integer``: whole only)."""

    help: str
    choices: tuple[str, ...] = ()
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False

    def describe(self) -> str:
        """The allowed values in words: "a number > 0", "a number in [0, 1)", "at least 1"."""
        if self.choices:
            return "one of " + ", ".join(self.choices)
        what = "an integer" if self.integer else "a number"
        if self.low == -math.inf and self.high is None:
            return f"a finite {what[3:] if self.integer else what[2:]}"
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"{what} in {left}{_num(self.low)}, {_num(self.high)}{right}"
        if self.low is not None:
            return f"{what} {'>' if self.low_open else '>='} {_num(self.low)}"
        return what

    def allows(self, value) -> bool:
        if self.choices:
            return value in self.choices
        if isinstance(value, bool) or not isinstance(value, int if self.integer else (int, float)):
            return False
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def check(name: str, value) -> None:
    """Raise a :class:`PronghornError` naming the setting, both spellings and the allowed values (each item
    of a list of numbers)."""
    rule = SETTINGS[name]
    if isinstance(value, list) and rule.low is not None:
        for item in value:
            check(name, item)
        return
    if (rule.choices or rule.low is not None or rule.high is not None) and value is not None and not rule.allows(value):
        raise PronghornError(f"{spell(name)} must be {rule.describe()}, got {value!r}")


_POS, _NONNEG = dict(low=0, low_open=True), dict(low=0)
_ONE, _COUNT = dict(low=1, integer=True), dict(low=0, integer=True)
_PROB = dict(low=0, high=1, high_open=True)

SETTINGS: dict[str, Setting] = {
    # what to train on
    "model": Setting("checkpoint dir, adapter dir, .gguf file, hub id or 'default' (SmolLM2-135M-Instruct)"),
    "data": Setting("training data: a .jsonl/.json/.parquet/.csv/.txt file, a dir or glob of them, or 'demo' for the "
                    "embedded set"),
    "output_dir": Setting("where the adapter, checkpoints, metrics.jsonl and loss.png go"),
    "overwrite": Setting("replace an existing output_dir's files instead of refusing"),
    "data_format": Setting("row format: text, raw_text (continued pretraining: documents cut into max_length "
                           "blocks, kept apart), prompt_completion, messages, sharegpt, alpaca, oasst, tokenized "
                           "(None: detected from the first row; raw_text only when named)"),
    "sample_by": Setting(".txt files: a row (document) per line, paragraph (blank-line separated) or document "
                         "(the whole file)", ("line", "paragraph", "document")),
    "train_on": Setting("which assistant turns carry the loss", ("all_assistant", "last_assistant")),
    "max_length": Setting("tokens per row at most (see overlong)", **_ONE),
    # optimisation
    "max_steps": Setting("optimizer steps (overrides num_epochs when set)", **_ONE),
    "num_epochs": Setting("passes over the data", **_POS),
    "batch_size": Setting("rows per micro-batch (per rank)", **_ONE),
    "gradient_accumulation_steps": Setting("micro-batches per optimizer step", **_ONE),
    "learning_rate": Setting("peak learning rate", **_POS),
    "embedding_learning_rate": Setting("peak learning rate of embed_tokens / lm_head when target_modules trains them "
                                       "(continued pretraining: e.g. a tenth of learning_rate; None: learning_rate)",
                                       **_POS),
    "lr_scheduler": Setting("learning-rate schedule after warm-up", ("linear", "cosine", "constant")),
    "warmup_steps": Setting("linear warm-up steps (wins over warmup_ratio when > 0)", **_COUNT),
    "warmup_ratio": Setting("warm-up as a fraction of all steps", low=0, high=1),
    "weight_decay": Setting("AdamW weight decay", **_NONNEG),
    "max_grad_norm": Setting("clip the gradient norm to this (0: no clipping)", **_NONNEG),
    "adam_beta1": Setting("AdamW beta1", **_PROB),
    "adam_beta2": Setting("AdamW beta2", **_PROB),
    "adam_epsilon": Setting("AdamW epsilon", **_NONNEG),
    "seed": Setting("seed of the shuffle, LoRA initialisation and dropout", **_COUNT),
    # LoRA
    "r": Setting("LoRA rank", **_ONE),
    "lora_alpha": Setting("LoRA alpha (scale alpha / r, or alpha / sqrt(r) with use_rslora)", **_POS),
    "lora_dropout": Setting("dropout on the LoRA input", **_PROB),
    "target_modules": Setting("projections that get adapters ('all-linear': all seven), and embed_tokens / lm_head "
                              "to train fully beside them (saved as PEFT modules_to_save)"),
    "use_rslora": Setting("rank-stabilised scale alpha / sqrt(r)"),
    # runtime
    "dtype": Setting("compute dtype (None: bfloat16 on a GPU, float32 on the CPU)", ("float32", "bfloat16", "float16")),
    "device": Setting("cpu, cuda, cuda:N (None: a GPU when there is one)"),
    "logging_steps": Setting("log metrics every N optimizer steps", **_ONE),
    "report_to": Setting("metrics also to TensorBoard (<output_dir>/tensorboard) or W&B offline (<output_dir>/wandb)",
                         ("none", "tensorboard", "wandb")),
    "save_steps": Setting("save a checkpoint every N steps (None: only at the end)", **_ONE),
    "save_total_limit": Setting("checkpoints kept (None: all)", **_ONE),
    "resume_from_checkpoint": Setting("a checkpoint dir, or 'latest' in output_dir"),
    "progress": Setting("show a progress bar (a line every few steps when output is not a terminal)"),
    # memory and speed
    "max_memory": Setting("the training step's memory budget, e.g. 16GiB or 24GB (None: what the GPU gives, within "
                          "set_per_process_memory_fraction); the fastest plan that fits is printed"),
    "gradient_checkpointing": Setting("recompute activations in backward: auto, on, off, offload ('unsloth')"),
    "tiled_mlp": Setting("norm + MLP over chunks of tokens: auto, on, off"),
    "tiled_mlp_chunk": Setting("tokens per chunk of the tiled MLP", **_ONE),
    "optim": Setting("optimizer: adamw_torch, adamw_torch_fused, adamw_8bit (bitsandbytes, GPU), adamw_bf16_sr, "
                     "adamw_bf16_master (bf16 weights: fp32 moments, stochastic rounding or an fp32 master copy), "
                     "adamw_bf16_sr_bf16_moments (bf16 moments, stochastically rounded too: half the state)"),
    "packing": Setting("pack rows padding-free into rows of <= max_length tokens"),
    "load_in_4bit": Setting("QLoRA: store the base model's projections in NF4 (4-bit)"),
    # multi-GPU
    "distributed": Setting("under torchrun / accelerate launch (auto: LoRA ddp, full fine-tuning fsdp)",
                           ("auto", "ddp", "fsdp")),
    "distributed_timeout_s": Setting("seconds a collective may wait before every rank stops", **_POS),
    # preference training
    "method": Setting("training objective", ("sft", "dpo", "orpo", "kto", "grpo")),
    "beta": Setting("DPO / ORPO / KTO beta (> 0; None: 0.1); GRPO: KL coefficient (None: 0, no reference forward)",
                    **_NONNEG),
    "loss_type": Setting("DPO loss (None: sigmoid); GRPO aggregation (None: dapo)",
                         ("sigmoid", "ipo", "hinge", "robust", "simpo", "dapo", "grpo", "dr_grpo")),
    "label_smoothing": Setting("DPO label smoothing (robust / conservative DPO)", low=0, high=0.5, high_open=True),
    "simpo_gamma": Setting("SimPO target reward margin", **_NONNEG),
    "max_prompt_length": Setting("prompt tokens kept at most (longer prompts keep their end)", **_ONE),
    "desirable_weight": Setting("KTO weight of desirable rows", **_POS),
    "undesirable_weight": Setting("KTO weight of undesirable rows", **_POS),
    "precompute_ref_log_probs": Setting("compute the reference model's log-probs once before training"),
    "skip_bad_rows": Setting("drop (and count) bad rows instead of stopping at the first"),
    # SFT data pipeline
    "truncation_mode": Setting("which end of an over-long row is kept", ("keep_start", "keep_end")),
    "overlong": Setting("rows over max_length", ("truncate", "split", "drop", "error")),
    "neftune_noise_alpha": Setting("NEFTune noise on the input embeddings while training, e.g. 5 (0 or None: off)",
                                   **_NONNEG),
    # full fine-tuning on one device
    "full_finetuning": Setting("train every weight instead of LoRA adapters (bf16 weights on a GPU; with the default "
                               "optim, bf16 weights train with adamw_bf16_sr); saves a Hugging Face checkpoint"),
    "optimizer_in_backward": Setting("step each weight as soon as its gradient is complete and free it: no full set of "
                                     "gradients (needs gradient_accumulation_steps 1 and max_grad_norm 0)"),
    # held-out evaluation
    "eval_data": Setting("held-out data, tokenized as the training data: eval_loss and eval_perplexity go to "
                         "metrics.jsonl"),
    "eval_split": Setting("hold out this fraction of the training rows (raw_text: documents), drawn with seed",
                          low=0, high=1, low_open=True, high_open=True),
    "eval_steps": Setting("evaluate every N optimizer steps, and after the last (None: after the last only)", **_ONE),
    "eval_batch_size": Setting("rows per evaluation batch (None: batch_size)", **_ONE),
    "eval_on_start": Setting("also evaluate before the first step (logged as step 0)"),
    # GRPO
    "num_generations": Setting("GRPO: completions sampled per prompt (a generation batch must hold a multiple)",
                               low=2, integer=True),
    "max_completion_length": Setting("GRPO: new tokens per completion at most", **_ONE),
    "steps_per_generation": Setting("GRPO: micro-batches of batch_size completions per generation batch; a batch is "
                                    "generated every steps_per_generation * num_iterations micro-batches (None: "
                                    "gradient_accumulation_steps, or generation_batch_size / batch_size)", **_ONE),
    "generation_batch_size": Setting("GRPO: completions per generation batch, a multiple of batch_size and of "
                                     "num_generations (None: batch_size * steps_per_generation); give this or "
                                     "steps_per_generation", **_ONE),
    "temperature": Setting("GRPO: sampling temperature (the log-probs are of the logits divided by it, as TRL)",
                           **_POS),
    "top_p": Setting("GRPO: nucleus sampling (1: off)", low=0, high=1, low_open=True),
    "top_k": Setting("GRPO: top-k sampling, only the k most likely tokens are drawn (0: off)", **_COUNT),
    "min_p": Setting("GRPO: min-p sampling (0: off)", low=0, high=1),
    "epsilon": Setting("GRPO: lower clipping range of the probability ratio", **_NONNEG),
    "epsilon_high": Setting("GRPO: upper clipping range (None: epsilon; DAPO: 0.28)", **_NONNEG),
    "scale_rewards": Setting("GRPO: divide advantages by the reward std of the group, of the batch, or not",
                             ("group", "batch", "none")),
    "num_iterations": Setting("GRPO: passes over each generation batch (TRL's mu; old log-probs kept)", **_ONE),
    "mask_truncated_completions": Setting("GRPO: completions cut at max_completion_length (no EOS or stop string) "
                                          "carry no loss; their rewards still count in the advantages"),
    "reward_funcs": Setting("GRPO: reward functions: built-in names (gsm8k_format, gsm8k_format_partial, "
                            "gsm8k_correct) or module:function import paths (Python: callables)"),
    "reward_weights": Setting("GRPO: weight of each reward function (None: 1 each)", low=-math.inf),
    "stop_strings": Setting("GRPO: a completion ends after any of these strings"),
    "use_bias_correction_kl": Setting("GRPO: multiply the KL term by the probability ratio (unbiased reverse-KL "
                                      "gradient, TRL's default)"),
}
