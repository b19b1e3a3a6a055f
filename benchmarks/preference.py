"""DPO training throughput and peak memory: pronghorn's PreferenceTrainer vs TRL's DPOTrainer + PEFT (+ Liger).

Same workload for every system: random-init weights with the real architecture config, bf16, LoRA r=16
alpha=16 dropout 0 on q,k,v,o,gate,up,down, gradient checkpointing on, AdamW, max_grad_norm 1, sigmoid DPO
beta 0.1, reference = the same model with adapters disabled (no reference copy, not precomputed), B pairs
per step, every pair a P-token prompt and C-token chosen / rejected completions (2B sequences of P + C
tokens per step). Token ids are random words of a small word-level tokenizer built here, so TRL tokenizes
the strings to exactly these lengths, offline. Tokens/s = 2 B (P + C) / median step time of steps 3..N;
peak = torch.cuda.max_memory_allocated over the training steps (weights included).

    python benchmarks/preference.py --json preference.json                     # H100: llama-3.2-1b
    python benchmarks/preference.py --gc-modes all --chunk-mib 1024,256 --micro-pairs 4,1   # pronghorn variants
    python benchmarks/preference.py --smoke --gc-modes all                     # CPU, tiny, seconds

pronghorn rows can vary what only pronghorn has (each combination is one row, ``variant`` in the table):
``--gc-modes`` (off | on | offload | auto | all; default on, like TRL's gradient checkpointing),
``--chunk-mib`` (the logits chunk budget of the fused log-prob head, default 1024), ``--micro-pairs``
(pairs per forward; the step still has B pairs through exact gradient accumulation, default B), ``--table``
(device | host: the tied embedding / head table in pinned host memory, the head streamed from there) and
``--mlp-chunk`` (tokens per chunk of the sequence-tiled MLP; 0, the default: untiled) and ``--replay`` (split |
whole: offload's layer replay one residual block at a time, the default, or whole).

Systems: ``pronghorn``, ``pronghorn-qlora`` (base projections in NF4: lower memory, not like-for-like), ``trl+peft`` (needs trl, peft, datasets), ``trl+peft+liger`` (also liger-kernel; skipped
when it is not importable).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from common import run_meta, step_timer, write_results

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.train_e2e import TARGETS, WORKLOADS  # noqa: E402

WORKLOADS = dict(WORKLOADS)
WORKLOADS["tiny"] = (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=1031, tie_word_embeddings=True, rope_theta=10000.0,
                          max_position_embeddings=512), 2, 64, "random")
N_WORDS = 1000  # tokenizer words w0..w999 -> ids 3..1002; ids 0/1/2 are pad/bos/eos


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(N_WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def _rows(pairs: int, prompt: int, completion: int, seed: int = 0) -> list[dict]:
    """Token rows; completions end with EOS (id 2) as TRL adds it to string completions."""
    g = torch.Generator().manual_seed(seed)
    words = lambda n: (torch.randint(0, N_WORDS, (n,), generator=g) + 3).tolist()
    return [{"prompt_ids": words(prompt), "chosen_ids": words(completion - 1) + [2],
             "chosen_mask": [1] * completion, "rejected_ids": words(completion - 1) + [2],
             "rejected_mask": [1] * completion} for _ in range(pairs)]


def _text(ids: list[int]) -> str:
    return " ".join(f"w{i - 3}" for i in ids if i >= 3)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _peak(device: str) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None


def run_pronghorn(cfg: dict, rows: list[dict], steps: int, device: str, dtype: torch.dtype, gc_mode: str = "on",
                  chunk_mib: int = 1024, micro_pairs: int | None = None, qlora: bool = False,
                  profile: bool = False, host_table: bool = False, mlp_chunk: int | None = None,
                  replay: str | None = None) -> dict:
    import importlib

    from pronghorn.models.builder import init_random_model
    from pronghorn.models.config import ModelConfig
    from pronghorn.models.lora import LoRAConfig, attach_lora
    from pronghorn.train.config import TrainConfig
    from pronghorn.train.preference_trainer import PreferenceTrainer

    config = ModelConfig.from_hf_dict({"model_type": "llama", "hidden_act": "silu", "rms_norm_eps": 1e-5, **cfg})
    model = init_random_model(config, dtype, device)
    attach_lora(model, LoRAConfig(r=16, lora_alpha=16, target_modules=TARGETS))
    if qlora:  # the base projections stored as NF4 (not like-for-like with the bf16 peers: a separate row)
        from pronghorn.models.linear import Linear

        for module in model.modules():
            if isinstance(module, Linear):
                module.quantize_nf4()
    # mlp_chunk: the norm + MLP over chunks of that many tokens (models/tiled_mlp.py), None: never tiled
    model.gradient_checkpointing_enable(mode=gc_mode, tiled_mlp="on" if mlp_chunk else "off",
                                        tiled_mlp_chunk=mlp_chunk or None, replay=replay or "split")
    if host_table:  # the tied embedding / head table in pinned host memory, the head streamed from there
        from pronghorn.models.host_embedding import offload_embedding

        offload_embedding(model, tied=True)
    tok = SimpleNamespace(pad_token_id=0, eos_token_id=2)
    micro = micro_pairs or len(rows)
    if len(rows) % micro:
        raise SystemExit(f"--micro-pairs {micro} does not divide {len(rows)} pairs per step")
    linear_logprobs = importlib.import_module("pronghorn.kernels.linear_logprobs")  # the module, not the function
    chunk_bytes, linear_logprobs.CHUNK_BYTES = linear_logprobs.CHUNK_BYTES, chunk_mib << 20
    with tempfile.TemporaryDirectory() as out:
        tc = TrainConfig(output_dir=out, method="dpo", beta=0.1, batch_size=micro,
                         gradient_accumulation_steps=len(rows) // micro, learning_rate=1e-4, max_grad_norm=1.0,
                         progress=False, gradient_checkpointing=gc_mode, tiled_mlp="on" if mlp_chunk else "off",
                         tiled_mlp_chunk=mlp_chunk or 8192)
        trainer = PreferenceTrainer(model, tok, rows, tc)
        model.train()
        _sync(device)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times, loss = [], None
        for _ in range(steps):
            _sync(device)
            t = time.perf_counter()
            loss, _, _ = trainer.train_step(rows)
            _sync(device)
            times.append(time.perf_counter() - t)
        peak = _peak(device)
        prof = None
        if profile:  # after the timed steps: the profiler's overhead touches neither tok/s nor the peak
            from step_profile import profile_steps

            train_step = trainer.train_step
            prof = profile_steps(lambda: train_step(rows), steps=2)
    linear_logprobs.CHUNK_BYTES = chunk_bytes
    del trainer, model
    return {"times": times, "peak_gib": peak, "loss": loss, "profile": prof}


def run_trl(cfg: dict, rows: list[dict], steps: int, device: str, dtype: torch.dtype, liger: bool) -> dict:
    import datasets
    import trl
    from peft import LoraConfig
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _tokenizer()
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**cfg, attn_implementation="sdpa", pad_token_id=0, bos_token_id=1,
                                             eos_token_id=2)).to(dtype)
    ds = datasets.Dataset.from_list([{"prompt": _text(r["prompt_ids"]), "chosen": " " + _text(r["chosen_ids"]),
                                      "rejected": " " + _text(r["rejected_ids"])} for r in rows] * steps)
    times: list[float] = []
    P, C = len(rows[0]["prompt_ids"]), len(rows[0]["chosen_ids"])
    with tempfile.TemporaryDirectory() as out:
        args = trl.DPOConfig(
            output_dir=out, per_device_train_batch_size=len(rows), gradient_accumulation_steps=1, max_steps=steps,
            learning_rate=1e-4, max_grad_norm=1.0, beta=0.1, loss_type=["sigmoid"], max_length=P + C,
            gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False},
            bf16=dtype == torch.bfloat16, use_cpu=device == "cpu", report_to="none", logging_steps=1,
            save_strategy="no", disable_tqdm=True, use_liger_kernel=liger, dataloader_num_workers=0, seed=0)
        peft_config = LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
        trainer = trl.DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok,
                                 peft_config=peft_config, callbacks=[step_timer(device, times)])
        first = trainer.train_dataset[0]
        assert len(first["prompt_ids"]) == P and len(first["chosen_ids"]) == C, "TRL tokenized other lengths"
        trainer.train()
        peak = _peak(device)
        loss = trainer.state.log_history[-2].get("loss") if len(trainer.state.log_history) > 1 else None
    del trainer, model
    return {"times": times, "peak_gib": peak, "loss": loss}


def measure(system: str, workload: str, steps: int, device: str, pairs: int | None, prompt: int | None,
            completion: int | None, variant: dict | None = None, profile: bool = False) -> dict:
    cfg, batch, seq = WORKLOADS[workload][:3]
    pairs = pairs or batch
    prompt = prompt or seq // 4
    completion = completion or seq // 4
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    rows = _rows(pairs, prompt, completion)
    torch.manual_seed(0)
    variant = variant or {}
    if system.startswith("pronghorn"):
        r = run_pronghorn(cfg, rows, steps, device, dtype, qlora=system == "pronghorn-qlora", profile=profile,
                          **variant)
    else:
        r = run_trl(cfg, rows, steps, device, dtype, liger=system.endswith("liger"))
        variant = {"gc_mode": "on"}
    steady = statistics.median(r["times"][2:] if len(r["times"]) > 2 else r["times"])
    tokens = 2 * pairs * (prompt + completion)
    out = dict(system=system, workload=workload, pairs=pairs, prompt=prompt, completion=completion,
               variant=",".join(f"{k}={v}" for k, v in variant.items() if v is not None), **variant,
               step_s=round(steady, 4), tok_s=round(tokens / steady), peak_gib=r["peak_gib"],
               loss=None if r["loss"] is None else round(float(r["loss"]), 4))
    if r.get("profile"):
        from step_profile import limit

        out["profile"], out["limit"] = r["profile"], limit(r["profile"])
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def available(system: str) -> str | None:
    """None when the system can run here, else why not."""
    import importlib.util

    need = {"trl+peft": ["trl", "peft", "datasets"], "trl+peft+liger": ["trl", "peft", "datasets", "liger_kernel"]}
    missing = [m for m in need.get(system, []) if importlib.util.find_spec(m) is None]
    return f"not installed: {', '.join(missing)}" if missing else None


def variants(a) -> list[dict]:
    """Every combination of the pronghorn-only options."""
    from pronghorn.models.recompute import MODES

    modes = list(MODES) if a.gc_modes == "all" else a.gc_modes.split(",")
    micro = [int(m) for m in a.micro_pairs.split(",")] if a.micro_pairs else [None]
    tables = [t == "host" for t in a.table.split(",")]
    mlp = [int(c) or None for c in a.mlp_chunk.split(",")]
    return [{"gc_mode": g, "chunk_mib": int(c), "micro_pairs": m, "host_table": t or None, "mlp_chunk": k,
             "replay": None if r == "split" else r}
            for g in modes for c in a.chunk_mib.split(",") for m in micro for t in tables for k in mlp
            for r in a.replay.split(",")]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workloads", default="llama-3.2-1b")
    ap.add_argument("--systems", default="pronghorn,trl+peft,trl+peft+liger")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--pairs", type=int, default=None, help="pairs per step (default: the workload's batch)")
    ap.add_argument("--prompt", type=int, default=None, help="prompt tokens (default: seq / 4)")
    ap.add_argument("--completion", type=int, default=None, help="completion tokens each side (default: seq / 4)")
    ap.add_argument("--gc-modes", default="on", help="pronghorn checkpointing modes: off,on,offload,auto or all")
    ap.add_argument("--chunk-mib", default="1024", help="pronghorn logits chunk budgets in MiB, comma-separated")
    ap.add_argument("--micro-pairs", default="", help="pronghorn pairs per forward, comma-separated (default B)")
    ap.add_argument("--table", default="device", help="pronghorn: where the tied embedding / head table lives, "
                                                      "comma-separated: device | host (offload_embedding='tied': "
                                                      "the head streams it; models/host_embedding)")
    ap.add_argument("--mlp-chunk", default="0", help="pronghorn: tokens per chunk of the sequence-tiled MLP, "
                                                      "comma-separated; 0: untiled (models/tiled_mlp)")
    ap.add_argument("--replay", default="split", help="pronghorn, offload mode: split | whole, comma-separated "
                                                       "(a layer's backward replay one residual block at a time)")
    ap.add_argument("--profile", action="store_true", help="pronghorn rows: also profile 2 steps (device time per "
                                                           "kernel category, idle, host syncs: benchmarks/step_profile)")
    ap.add_argument("--json", default="preference.json")
    ap.add_argument("--smoke", action="store_true", help="tiny model on the CPU, 3 steps")
    a = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() and not a.smoke else "cpu"
    if a.smoke:
        a.workloads, a.steps = "tiny", 3
    rows = []
    for w in a.workloads.split(","):
        for s in a.systems.split(","):
            why = available(s)
            if why:
                print(f"skip {s}: {why}", flush=True)
                continue
            for variant in (variants(a) if s.startswith("pronghorn") else [None]):
                rows.append(measure(s, w, a.steps, device, a.pairs, a.prompt, a.completion, variant, a.profile))
                print(json.dumps(rows[-1]), flush=True)
    base = {r["workload"]: r for r in rows if r["system"] == "trl+peft"}
    print(f"\n{'workload':<14} {'system':<16} {'variant':<44} {'tok/s':>8} {'peak GiB':>9} {'speed vs trl+peft':>18} "
          f"{'memory vs':>10} {'loss':>7}")
    for r in rows:
        ref = base.get(r["workload"])
        speed = f"{r['tok_s'] / ref['tok_s']:.2f}x" if ref else "-"
        mem = f"{r['peak_gib'] / ref['peak_gib']:.2f}x" if ref and r["peak_gib"] and ref["peak_gib"] else "-"
        print(f"{r['workload']:<14} {r['system']:<16} {r['variant']:<44} {r['tok_s']:>8} {str(r['peak_gib']):>9} "
              f"{speed:>18} {mem:>10} {str(r['loss']):>7}" + (f"  limit: {r['limit']}" if "limit" in r else ""))
    for r in rows:
        if "profile" in r:
            print(f"{r['system']:<16} {r['variant']:<40} per step, ms: " +
                  " ".join(f"{k}={v}" for k, v in r["profile"].items()))
    write_results(a.json, run_meta(smoke=a.smoke), rows)

if __name__ == "__main__":
    main()
