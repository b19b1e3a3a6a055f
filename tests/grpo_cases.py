"""A fixed GRPO batch for the tests: a tiny LoRA model, prompts and completions of several lengths, and a
deterministic reward, so losses and gradients can be compared with other implementations."""

from __future__ import annotations

import torch

from helpers import make_tiny_tokenizer, randomize_lora_b, tiny_lora_model
from pronghorn.train.config import TrainConfig
from pronghorn.train.grpo_rollout import Rollout
from pronghorn.train.grpo_trainer import GRPOTrainer

PROMPTS = 2
G = 3
EOS = 2  # the tiny tokenizer's <|im_end|>


def token_sum_reward(prompts, completions, completion_ids, **_):
    """A reward that differs within each group: the completion's token ids summed, mod 7."""
    return [float(sum(ids) % 7) for ids in completion_ids]


def fixed_batch(seed: int = 0) -> tuple[list[dict], Rollout]:
    """(one dataset row per completion, the completions) with lengths 1..9, some ending in EOS."""
    g = torch.Generator().manual_seed(seed)
    prompts = []
    for p in range(PROMPTS):
        n = int(torch.randint(3, 8, (1,), generator=g))
        prompts.append({"prompt": f"prompt {p}", "prompt_ids": torch.randint(3, 97, (n,), generator=g).tolist()})
    rows = [p for p in prompts for _ in range(G)]
    completions = []
    for i in range(len(rows)):
        n = int(torch.randint(1, 10, (1,), generator=g))
        ids = torch.randint(3, 97, (n,), generator=g).tolist()
        completions.append(ids[:-1] + [EOS] if i % 2 else ids)
    ro = Rollout([r["prompt_ids"] for r in rows], completions, [f"c{i}" for i in range(len(rows))],
                 [i % 2 == 0 for i in range(len(rows))], seconds=1.0)
    return rows, ro


def grpo_trainer(tmp_path, dtype=torch.float32, prompts: list[dict] | None = None, device: str = "cpu",
                 **settings) -> GRPOTrainer:
    """A GRPOTrainer of the tiny model on ``prompts`` (default: the fixed batch's two), on ``device``."""
    model = tiny_lora_model(dtype=dtype).to(device).train()
    randomize_lora_b(model, seed=3, scale=0.2)
    cfg = dict(method="grpo", output_dir=str(tmp_path), progress=False, num_generations=G, batch_size=2,
               gradient_accumulation_steps=3, max_completion_length=9, reward_funcs=[token_sum_reward],
               learning_rate=1e-2, lr_scheduler="constant", gradient_checkpointing="off")
    if prompts is None:
        prompts = fixed_batch()[0][::G]
    return GRPOTrainer(model, make_tiny_tokenizer(), prompts, TrainConfig(**{**cfg, **settings}), base_name="tiny")
