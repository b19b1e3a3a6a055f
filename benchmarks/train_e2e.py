"""End-to-end LoRA training throughput and peak memory on the peers' workloads (../shared/bench/README.md).

Random-init weights with the real architecture configs, bf16, LoRA r=16 alpha=16 dropout 0 on q,k,v,o,gate,up,
down, random token ids, labels = input ids, AdamW, median step time of steps 3..N. Runs pronghorn and, in the
same process and on the same GPU, Hugging Face transformers + PEFT (gradient checkpointing on, as the peers ran).

pronghorn's checkpointing is ``--gc`` (auto = the per-layer memory plan, the default; on; offload; off);
``--lowest-memory`` is the preset for the "lowest memory" targets (every layer input offloaded to the host, and
an untied input embedding table kept in pinned host memory: ``--offload-embedding``).

Real-data workloads (``*-gsm8k``): gsm8k train from ../shared/data, chat-formatted with the SmolLM2 tokenizer,
packed padding-free (best-fit decreasing, per-sequence positions) into rows of ``seq`` tokens; every system
gets the same rows (HF + PEFT: ``position_ids`` without an attention mask, its own packed-sequence masking).
``tok_s`` counts real tokens only.

    python benchmarks/train_e2e.py --workloads llama-3.2-1b,llama-3.1-8b --gc auto --json results.json
    python benchmarks/train_e2e.py --smoke          # tiny CPU run of every path (CI / no GPU)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import peak_bytes, run_meta, write_results

_REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(_REPO))  # this tree's pronghorn, whatever is installed
GSM8K = next((p for p in (_REPO / "shared", _REPO.parent / "shared", Path("/work/shared"))
              if (p / "data/gsm8k/train.jsonl").is_file()), _REPO / "shared") / "data/gsm8k/train.jsonl"
_LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0,
                 max_position_embeddings=131072)
_SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0,
                max_position_embeddings=8192)
WORKLOADS = {  # name: (config, batch, seq, data)
    "llama-3.2-1b": (_LLAMA_1B, 4, 2048, "random"),
    "llama-3.1-8b": (dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                          num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0,
                          max_position_embeddings=131072), 2, 2048, "random"),
    "smollm2-135m": (_SMOLLM2, 8, 2048, "random"),
    "smollm2-135m-gsm8k": (_SMOLLM2, 8, 2048, "gsm8k"),
    "llama-3.2-1b-gsm8k": (_LLAMA_1B, 4, 2048, "gsm8k"),
    # --smoke: a tiny Llama on the CPU, random and real data
    "tiny": (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=49152, tie_word_embeddings=True, rope_theta=10000.0,
                  max_position_embeddings=512), 2, 128, "random"),
    "tiny-gsm8k": (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=49152, tie_word_embeddings=True, rope_theta=10000.0,
                        max_position_embeddings=512), 2, 384, "gsm8k"),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GC_MODES = ("off", "on", "offload", "auto")


REPLAY = "auto"  # --replay: how pronghorn replays a recomputed layer (models/recompute.py)


def _pronghorn_model(cfg: dict, device: str, dtype: torch.dtype, gc_mode: str):
    from pronghorn.models.builder import init_random_model
    from pronghorn.models.config import ModelConfig
    from pronghorn.models.lora import LoRAConfig, attach_lora

    config = ModelConfig.from_hf_dict({"model_type": "llama", "hidden_act": "silu", "rms_norm_eps": 1e-5, **cfg})
    model = init_random_model(config, dtype, device)
    attach_lora(model, LoRAConfig(r=16, lora_alpha=16, target_modules=TARGETS))
    model.gradient_checkpointing_enable(mode=gc_mode, replay=REPLAY)
    return model


def _pronghorn_qlora_model(cfg: dict, device: str, dtype: torch.dtype, gc_mode: str):
    """The same model with every projection's base weight stored as NF4 (QLoRA), quantized layer by layer."""
    from pronghorn.models.linear import Linear

    model = _pronghorn_model(cfg, device, dtype, gc_mode)
    for module in model.modules():
        if isinstance(module, Linear):
            module.quantize_nf4()
    if device == "cuda":
        torch.cuda.empty_cache()
    return model


def _hf_peft_model(cfg: dict, device: str, dtype: torch.dtype, gc_mode: str):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**cfg, attn_implementation="sdpa")).to(dtype)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS,
                                             task_type="CAUSAL_LM"))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    return model


SYSTEMS = {"pronghorn": _pronghorn_model, "pronghorn-qlora": _pronghorn_qlora_model, "hf+peft": _hf_peft_model}


def gsm8k_batches(batch: int, seq: int, steps: int, smoke: bool) -> list[tuple[dict, int]]:
    """``steps`` batches of ``batch`` packed rows of at most ``seq`` tokens from gsm8k train (SmolLM2 chat
    template and tokenizer): (input_ids, labels, position_ids as CPU tensors; real tokens in the batch)."""
    from pronghorn.data import tokenize_dataset
    from pronghorn.data.packing import collate_packed, pack_examples
    from pronghorn.models.default_model import default_model_dir
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(default_model_dir()))
    need = batch * steps * max(1, seq // 180)  # gsm8k rows are ~180 tokens with the template
    rows = []
    if not GSM8K.is_file():
        raise SystemExit(f"gsm8k not found (looked for shared/data/gsm8k/train.jsonl in and beside the repo): {GSM8K}")
    with GSM8K.open() as f:
        for line in f:
            r = json.loads(line)
            rows.append({"messages": [{"role": "user", "content": r["question"]},
                                      {"role": "assistant", "content": r["answer"]}]})
            if len(rows) >= (need * 2 if not smoke else 64):
                break
    examples = tokenize_dataset(rows, tokenizer, "messages", seq, progress=False, overlong="drop")
    packed = pack_examples(examples, seq)
    packed = (packed * (batch * steps // max(1, len(packed)) + 1))[:batch * steps]
    chunks = [packed[i * batch:(i + 1) * batch] for i in range(steps)]
    return [(collate_packed(c, tokenizer.pad_token_id or 0), sum(len(r["input_ids"]) for r in c)) for c in chunks]


def measure(system: str, workload: str, steps: int, gc_mode: str, optim: str, device: str,
            profile: bool = False, offload_embedding: bool = False, max_memory: float | None = None) -> dict:
    from pronghorn.train.optimizers import build_optimizer

    cfg, batch, seq, data = WORKLOADS[workload]
    cuda = device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)
    model = SYSTEMS[system](cfg, device, dtype, gc_mode)
    host_table = False
    if offload_embedding and system.startswith("pronghorn"):
        from pronghorn.models.host_embedding import offload_embedding as to_host

        host_table = to_host(model)
    if max_memory is not None and system.startswith("pronghorn"):  # the memory plan's budget, as get_peft_model's
        model.set_memory_budget(int(max_memory * 2**30))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(params, optim, 1e-4, (0.9, 0.999), 1e-8, 0.0, torch.device(device))
    if data == "gsm8k":
        packed = gsm8k_batches(batch, seq, steps, not cuda)
        batches = [{k: v.to(device) for k, v in b.items()} for b, _ in packed]
        if system == "hf+peft":  # no cache object: transformers then builds its packed-sequence masks
            batches = [{**b, "use_cache": False} for b in batches]
        tokens = [n for _, n in packed]  # real tokens, not the padding of a short last row
    else:
        ids = torch.randint(0, cfg["vocab_size"], (batch, seq), device=device)
        batches, tokens = [{"input_ids": ids, "labels": ids}] * steps, [batch * seq] * steps
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    def step(b):
        with torch.autocast(device, dtype=dtype, enabled=cuda):
            loss = model(**b).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    times, loss = [], None
    for b in batches:
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        loss = step(b)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        if cuda and len(times) == 2 and len(batches) > 2:  # the peak of the steady steps: after the first plan
            warmup_peak = torch.cuda.max_memory_allocated()  # and the replay graphs' captures
            torch.cuda.reset_peak_memory_stats()
    steady = sorted(range(len(times))[2:] or range(len(times)), key=times.__getitem__)
    mid = steady[len(steady) // 2]
    out = dict(system=system, workload=workload, gc=gc_mode if system.startswith("pronghorn") else "on", optim=optim,
               embedding_on_host=host_table,
               batch=batch, seq=seq, step_s=round(times[mid], 4), tok_s=round(tokens[mid] / times[mid]),
               peak_gib=round(peak_bytes(model) / 2**30, 2) if cuda else None,  # steps 3+, the graphs' pool too
               loss=round(float(loss), 4))
    if cuda and len(batches) > 2:
        out["warmup_peak_gib"] = round(warmup_peak / 2**30, 2)  # steps 1-2 (a graph's capture allocates for real)
    plan = getattr(getattr(model, "model", None), "memory_plan", None)
    if plan is not None:
        out.update(max_memory_gib=max_memory, plan=plan.summary())
    if profile:  # after the timed steps, so the profiler's overhead does not touch tok/s or the peak
        from step_profile import limit, profile_steps

        trace = os.environ.get("PROFILE_TRACE")  # a path: also the Chrome trace of the profiled steps, gzipped
        out["profile"] = profile_steps(lambda: step(batches[-1]), steps=2,
                                       trace=trace and f"{trace}-{workload}-{gc_mode}.json")
        out["limit"] = limit(out["profile"])
    model = opt = params = loss = batches = None  # free before the next row (the closure holds them too)
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workloads", default="llama-3.2-1b,llama-3.1-8b,smollm2-135m-gsm8k")
    ap.add_argument("--systems", default="pronghorn,hf+peft")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--gc", default="auto", help="pronghorn's checkpointing; comma-separate to run several: "
                                                 "off,on,offload,auto")
    ap.add_argument("--lowest-memory", action="store_true", help="preset: --gc offload (every layer input on "
                                                                 "the host, prefetched for the backward) and "
                                                                 "--offload-embedding")
    ap.add_argument("--offload-embedding", action="store_true", help="pronghorn: an untied input embedding table "
                                                                     "in pinned host memory (models/host_embedding)")
    ap.add_argument("--replay", default="auto", choices=("auto", "split", "whole"), help="pronghorn: a replayed "
                    "layer's backward one residual block at a time, whole, or as the memory plan picks (recompute.py)")
    ap.add_argument("--residual-norm", default="fused", choices=("fused", "unfused"), help="pronghorn ablation: "
                    "unfused: the pre-norms hand back x and autograd sums its two gradients (kernels/rmsnorm_triton)")
    ap.add_argument("--optim", default="adamw_torch_fused", help="adamw_torch_fused | adamw_torch | adamw_8bit")
    ap.add_argument("--max-memory", type=float, default=None, help="GiB: pronghorn's memory budget (the plan "
                                                                   "that fits it, e.g. to profile a lean plan)")
    ap.add_argument("--profile", action="store_true", help="also profile 2 steps per row: device time per kernel "
                                                           "category, idle gaps, host syncs (benchmarks/step_profile)")
    ap.add_argument("--smoke", action="store_true", help="tiny workloads, 3 steps, every --gc mode; runs on a CPU")
    ap.add_argument("--json", default=None, help="results file (default train_e2e.json; --smoke: a temp file)")
    a = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if a.smoke:
        a.workloads, a.steps, a.gc = "tiny,tiny-gsm8k", 3, ",".join(GC_MODES)
        a.json = a.json or str(Path(tempfile.mkdtemp()) / "train_e2e_smoke.json")
    a.json = a.json or "train_e2e.json"
    if a.lowest_memory:
        a.gc, a.offload_embedding = "offload", True
    if device == "cpu" and not a.smoke:
        raise SystemExit("no CUDA device: run with --smoke on a CPU")
    global REPLAY
    REPLAY = a.replay
    if a.residual_norm == "unfused":  # the ablation: the norm's own Function, the residual's sum left to autograd
        from pronghorn.models.norm import RMSNorm

        RMSNorm.with_residual = lambda self, x: (self(x), x)
    modes = a.gc.split(",")
    bad = [m for m in modes if m not in GC_MODES]
    if bad:
        raise SystemExit(f"--gc {bad}: choose from {GC_MODES}")
    rows = []
    for w in a.workloads.split(","):
        for s in a.systems.split(","):
            for mode in modes if s.startswith("pronghorn") else ["on"]:
                rows.append(measure(s, w, a.steps, mode, a.optim, device, a.profile, a.offload_embedding,
                                    a.max_memory))
                print(json.dumps(rows[-1]), flush=True)
    base = {r["workload"]: r for r in rows if r["system"] == "hf+peft"}
    print(f"\n{'workload':<20} {'system':<10} {'gc':<8} {'tok/s':>8} {'peak GiB':>9} {'vs hf+peft':>10}")
    for r in rows:
        ref = base.get(r["workload"])
        ratio = f"{r['tok_s'] / ref['tok_s']:.2f}x" if ref else "-"
        print(f"{r['workload']:<20} {r['system']:<10} {r['gc']:<8} {r['tok_s']:>8} {str(r['peak_gib']):>9} "
              f"{ratio:>10}" + (f"  limit: {r['limit']}" if "limit" in r else ""))
    if a.profile:
        print("\nper step, ms (" + ", ".join(f"{r['workload']}/{r['system']}/{r['gc']}" for r in rows) + "):")
        for r in rows:
            print(f"{r['workload']:<20} {r['system']:<16} {r['gc']:<8} " +
                  " ".join(f"{k}={v}" for k, v in r["profile"].items()))
    write_results(a.json, run_meta(optim=a.optim, steps=a.steps, offload_embedding=a.offload_embedding,
                                   replay=a.replay, residual_norm=a.residual_norm), rows)

if __name__ == "__main__":
    main()
