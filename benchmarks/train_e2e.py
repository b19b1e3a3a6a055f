"""End-to-end LoRA training throughput and peak memory on the peers' workloads (../shared/bench/README.md).

Random-init weights with the real architecture configs, bf16, LoRA r=16 alpha=16 dropout 0 on q,k,v,o,gate,up,
down, random token ids, labels = input ids, AdamW, gradient checkpointing on, median step time of steps 3..N.
Runs pronghorn and, in the same process and on the same GPU, Hugging Face transformers + PEFT.

    python benchmarks/train_e2e.py --workloads llama-3.2-1b,llama-3.1-8b --json results.json
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import time

import torch

WORKLOADS = {  # name: (config, batch, seq)
    "llama-3.2-1b": (dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                          num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0,
                          max_position_embeddings=131072), 4, 2048),
    "llama-3.1-8b": (dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                          num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0,
                          max_position_embeddings=131072), 2, 2048),
    "smollm2-135m": (dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                          num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0,
                          max_position_embeddings=8192), 8, 2048),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _pronghorn_model(cfg: dict):
    from pronghorn.models.builder import init_random_model
    from pronghorn.models.config import ModelConfig
    from pronghorn.models.lora import LoRAConfig, attach_lora

    config = ModelConfig.from_hf_dict({"model_type": "llama", "hidden_act": "silu", "rms_norm_eps": 1e-5, **cfg})
    model = init_random_model(config, torch.bfloat16, "cuda")
    attach_lora(model, LoRAConfig(r=16, lora_alpha=16, target_modules=TARGETS))
    model.gradient_checkpointing_enable()
    return model


def _hf_peft_model(cfg: dict):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("cuda"):
        model = LlamaForCausalLM(LlamaConfig(**cfg, attn_implementation="sdpa")).to(torch.bfloat16)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS,
                                             task_type="CAUSAL_LM"))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    return model


SYSTEMS = {"pronghorn": _pronghorn_model, "hf+peft": _hf_peft_model}


def measure(system: str, workload: str, steps: int) -> dict:
    cfg, batch, seq = WORKLOADS[workload]
    torch.manual_seed(0)
    model = SYSTEMS[system](cfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    ids = torch.randint(0, cfg["vocab_size"], (batch, seq), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times, loss = [], None
    for _ in range(steps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    steady = sorted(times[2:])[len(times[2:]) // 2]
    out = dict(system=system, workload=workload, batch=batch, seq=seq, step_s=round(steady, 4),
               tok_s=round(batch * seq / steady), peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
               loss=round(float(loss), 4))
    del model, opt, params, loss
    gc.collect()
    torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workloads", default="llama-3.2-1b,llama-3.1-8b")
    ap.add_argument("--systems", default="pronghorn,hf+peft")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--json", default="train_e2e.json")
    a = ap.parse_args()
    rows = []
    for w in a.workloads.split(","):
        for s in a.systems.split(","):
            rows.append(measure(s, w, a.steps))
            print(json.dumps(rows[-1]), flush=True)
    base = {(r["workload"]): r for r in rows if r["system"] == "hf+peft"}
    print(f"\n{'workload':<14} {'system':<10} {'tok/s':>8} {'peak GiB':>9} {'vs hf+peft':>10}")
    for r in rows:
        ref = base.get(r["workload"])
        ratio = f"{r['tok_s'] / ref['tok_s']:.2f}x" if ref else "-"
        print(f"{r['workload']:<14} {r['system']:<10} {r['tok_s']:>8} {r['peak_gib']:>9} {ratio:>10}")
    import transformers
    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, transformers=transformers.__version__,
                python=platform.python_version(), date=time.strftime("%Y-%m-%d"))
    with open(a.json, "w") as f:
        json.dump({"meta": meta, "results": rows}, f, indent=2)
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
