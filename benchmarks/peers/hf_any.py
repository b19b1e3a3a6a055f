"""Peer: Hugging Face transformers + PEFT LoRA / QLoRA (NF4) on any family's checkpoint dir, gradient checkpointing
on (non-reentrant), transformers' default attention for the family. The measurement of ../shared/bench's
hf_baseline.py: LoRA r=16 alpha=16 dropout 0 on every projection, random ids of the config's vocabulary, labels =
inputs, AdamW lr 1e-4, median step of steps 3..N, peak = ``torch.cuda.max_memory_allocated()`` reset after the
model is built; one JSON line with its keys. ``unsloth_any.py`` shares :func:`measure`.

    python benchmarks/peers/hf_any.py --dir /tmp/models/gemma-2-9b --bs 2 --seq 2048 --q4 1
"""
import argparse
import json
import os
import time

import torch


def lora_targets(model_type: str) -> list[str]:
    """PEFT's names for q,k,v,o,gate,up,down on transformers' modules: Phi-3 keeps q,k,v and gate,up fused
    (``qkv_proj``, ``gate_up_proj``: one adapter each, A shared by the parts)."""
    if model_type == "phi3":
        return ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    return ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_args():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True, help="an HF checkpoint dir (config.json, weights, tokenizer)")
    ap.add_argument("--bs", type=int, default=2)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--q4", type=int, default=0)
    a = ap.parse_args()
    with open(os.path.join(a.dir, "config.json")) as f:
        a.config = json.load(f)
    return a


def forward_flops_per_token(cfg: dict, seq: int) -> float:
    """hf_baseline.py's count with the head size the config states: 2 x the matmul weights + attention as if causal
    everywhere (sliding windows ignored)."""
    h, i, layers, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    q = heads * (cfg.get("head_dim") or h // heads)
    weights = layers * (2 * h * q + 2 * h * kv * q // heads + 3 * h * i) + h * vocab
    return 2 * weights + 4 * layers * seq * q


def measure(model, a, system: str) -> None:
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, a.config["vocab_size"], (a.bs, a.seq), device="cuda")
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(a.steps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    steady = sorted(times[2:])[len(times[2:]) // 2]
    tok_s = a.bs * a.seq / steady
    flops = 3 * forward_flops_per_token(a.config, a.seq)  # LoRA: forward, recompute, input-gradient backward
    print(json.dumps(dict(system=system, model=os.path.basename(a.dir.rstrip("/")), q4=a.q4, bs=a.bs, seq=a.seq,
                          step_s=round(steady, 4), tok_s=round(tok_s),
                          peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
                          mfu_989=round(tok_s * flops / 989e12, 3), loss=round(loss.item(), 3),
                          attn=getattr(model.config, "_attn_implementation", None))), flush=True)


def main():
    a = parse_args()
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16) if a.q4 else None
    model = AutoModelForCausalLM.from_pretrained(a.dir, dtype=torch.bfloat16, quantization_config=quant,
                                                 device_map={"": 0})
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                                             target_modules=lora_targets(a.config["model_type"])))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    measure(model, a, "hf+peft")


if __name__ == "__main__":
    main()
