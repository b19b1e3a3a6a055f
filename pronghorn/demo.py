"""The main job in one call: fine-tune the default model on the embedded persona set and show the change."""

from __future__ import annotations

import time

from rich.console import Console
from rich.table import Table

from .api import FastLanguageModel
from .train.run import train

QUESTIONS = ["Who are you?", "What is your name?", "Who made you?", "What is the capital of Italy?"]


def _answers(model, tokenizer, max_new_tokens: int = 48) -> list[str]:
    out = []
    for q in QUESTIONS:
        enc = tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)
        enc = {k: v.to(model.device) for k, v in enc.items()}
        ids = model.generate(**enc, max_new_tokens=max_new_tokens)
        out.append(tokenizer.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    return out


def run_demo(output_dir: str = "outputs/demo", overwrite: bool = True, epochs: float = 3.0) -> dict:
    console = Console()
    t0 = time.perf_counter()
    console.rule("[bold]pronghorn demo: SmolLM2-135M-Instruct learns a new identity with LoRA")
    model, tokenizer = FastLanguageModel.from_pretrained("default")
    before = _answers(FastLanguageModel.for_inference(model), tokenizer)
    del model
    result = train(model="default", data="demo", output_dir=output_dir, overwrite=overwrite, num_epochs=epochs,
                   batch_size=8, gradient_accumulation_steps=1, learning_rate=1e-3, warmup_steps=3, max_length=256,
                   r=16, lora_alpha=16)
    tuned, tokenizer = FastLanguageModel.from_pretrained(output_dir)
    after = _answers(FastLanguageModel.for_inference(tuned), tokenizer)
    table = Table(title="greedy answers before and after fine-tuning", show_lines=True)
    table.add_column("question", style="bold")
    table.add_column("before")
    table.add_column("after", style="green")
    for q, b, a in zip(QUESTIONS, before, after):
        table.add_row(q, b, a)
    console.print(table)
    console.print(f"loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f} in {result.global_step} steps; "
                  f"adapter, metrics.jsonl and loss.png in {output_dir}; {time.perf_counter() - t0:.0f} s in all")
    console.print(f"chat with it:  pronghorn chat --model {output_dir}")
    return {"before": before, "after": after, "losses": result.losses}
