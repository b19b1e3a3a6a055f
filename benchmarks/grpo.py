"""GRPO step time split into generation and training, and peak memory: pronghorn's GRPOTrainer vs TRL's
GRPOTrainer + PEFT (use_vllm=False) vs Unsloth's patched GRPOTrainer without ``fast_inference`` (issue 18).

Same call for every system: random-init weights with the Llama-3.2-1B config (``--workload``), bf16, LoRA r=16
alpha=16 dropout 0 on q,k,v,o,gate,up,down, gradient checkpointing on, AdamW lr 1e-6, 8 prompts x 8 completions
per step (64 completions: per-device batch 8 x 8 accumulation steps), each prompt 64 random words, completions
sampled at temperature 1 up to 256 new tokens (random weights make EOS about as likely as any token, so the
mean completion length is reported beside the times), loss "dapo", beta 0, one reward (completion length in
words). Step time: the median of steps 2..N; generation: the time inside the decoder
call(s) of that step; training: the rest (scoring, log-probs, forward/backward, optimizer). Peak:
``torch.cuda.max_memory_allocated`` over the steps (weights included); pronghorn's also per phase (generation and
scoring, what stays allocated after it, training), to find where its peak is.

Each system runs in its own process (Unsloth patches TRL when imported): ``--child SYSTEM`` prints one JSON
line; the parent prints the table and writes the JSON.

    python benchmarks/grpo.py --json grpo.json                 # GPU: llama-3.2-1b, every system installed
    python benchmarks/grpo.py --systems pronghorn,trl+peft     # a subset
    python benchmarks/grpo.py --dry-run                        # CPU: a tiny model, 2 x 4 completions of 16 tokens
    python benchmarks/grpo.py --systems trl+peft,pronghorn --pronghorn-budget trl+peft   # + pronghorn at TRL's peak

``--pronghorn-budget SYSTEM`` (or a number of GiB, for a diagnosis alone) runs pronghorn once more with ``max_memory`` (and the process's memory fraction) set
to that system's peak measured in this call: the issue's "at <= its memory", as a user would ask for it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

_REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(_REPO))  # this tree's pronghorn, whatever is installed
from common import run_meta, step_timer, write_results  # noqa: E402
from train_e2e import TARGETS, WORKLOADS  # noqa: E402

SYSTEMS = ("pronghorn", "trl+peft", "unsloth")
N_WORDS = 1000  # tokenizer words w0..w999 -> ids 3..1002; ids 0/1/2 are pad/bos/eos
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=1031, tie_word_embeddings=True, rope_theta=10000.0, max_position_embeddings=512)


def shape(a) -> dict:
    """The workload: model config, prompts, completions per prompt, prompt and completion tokens, steps."""
    if a.dry_run:
        return dict(cfg=TINY, prompts=2, generations=4, prompt_len=16, new_tokens=16, steps=3)
    return dict(cfg=WORKLOADS[a.workload][0], prompts=a.prompts, generations=a.generations, prompt_len=64,
                new_tokens=a.new_tokens, steps=a.steps)


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(N_WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def _prompts(n: int, length: int) -> list[str]:
    g = torch.Generator().manual_seed(0)
    return [" ".join(f"w{i}" for i in torch.randint(0, N_WORDS, (length,), generator=g).tolist()) for _ in range(n)]


def word_count(prompts, completions, **_):
    return [float(len(c.split())) for c in completions]


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _llama_config(cfg: dict):
    from transformers import LlamaConfig

    return LlamaConfig(**cfg, attn_implementation="sdpa", pad_token_id=0, bos_token_id=1, eos_token_id=2)


def run_pronghorn(w: dict, device: str, dtype: torch.dtype, out: str, max_memory: float | None = None) -> dict:
    from pronghorn.models.builder import init_random_model
    from pronghorn.models.config import ModelConfig
    from pronghorn.models.lora import LoRAConfig, attach_lora
    from pronghorn.train.config import TrainConfig
    from pronghorn.train.grpo_trainer import GRPOTrainer

    config = ModelConfig.from_hf_dict({"model_type": "llama", "hidden_act": "silu", "rms_norm_eps": 1e-5,
                                       "eos_token_id": 2, **w["cfg"]})
    model = init_random_model(config, dtype, device)
    attach_lora(model, LoRAConfig(r=16, lora_alpha=16, target_modules=TARGETS))
    model.gradient_checkpointing_enable(mode="on")
    tok = _tokenizer()
    rows = [{"prompt": p} for p in _prompts(w["prompts"], w["prompt_len"])]
    G = w["generations"]
    cfg = TrainConfig(method="grpo", output_dir=out, num_generations=G, batch_size=G, gradient_accumulation_steps=
                      w["prompts"], max_completion_length=w["new_tokens"], learning_rate=1e-6, progress=False,
                      reward_funcs=[word_count], gradient_checkpointing="on", max_steps=w["steps"],
                      max_memory=None if max_memory is None else f"{max_memory}GiB")
    trainer = GRPOTrainer(model, tok, rows, cfg, base_name="random")
    model.train()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    steps, gens, lengths = [], [], []
    phases = dict(generation=0, held_after_generation=0, training=0)  # bytes: where the peak is (CUDA)
    for step in range(w["steps"]):
        _sync(device)
        t = time.perf_counter()
        batch = trainer.step_examples(step)
        _phase_peak(phases, "generation", device, held="held_after_generation")
        _memory_line(f"step {step} after generation", device, max_memory)
        trainer.train_step(batch)
        _phase_peak(phases, "training", device)
        _memory_line(f"step {step} after training", device, max_memory)
        _sync(device)
        steps.append(time.perf_counter() - t)
        gens.append(sum(b.rollout.seconds for b in batch.generated))  # one generation batch per step here
        lengths.append(batch.metrics["completions/mean_length"])
    return dict(steps=steps, gens=gens, lengths=lengths, phases=phases if device == "cuda" else None,
                generation=getattr(trainer, "generation_estimate", None))  # rows a round, its estimated peak


def _graph_pool(segment: dict) -> bool:
    """Whether a memory snapshot's segment belongs to a private pool (a CUDA graph's), not the default one."""
    return segment.get("segment_pool_id", (0, 0)) != (0, 0)


def _memory_line(where: str, device: str, max_memory: float | None) -> None:
    """Under a budget with GRPO_MEMORY_HISTORY set: what is allocated, reserved and held by CUDA-graph pools now
    (stderr, for a failed run). Off otherwise: the snapshot would add to the timed step."""
    if device == "cuda" and max_memory is not None and os.environ.get("GRPO_MEMORY_HISTORY"):
        private = sum(b["size"] for seg in torch.cuda.memory._snapshot()["segments"] if _graph_pool(seg)
                      for b in seg["blocks"] if b["state"] == "active_allocated")
        print(f"pronghorn memory {where}: allocated {torch.cuda.memory_allocated() / 2**30:.3f} GiB, reserved "
              f"{torch.cuda.memory_reserved() / 2**30:.3f}, in CUDA-graph pools {private / 2**30:.3f}",
              file=sys.stderr, flush=True)


def live_blocks(top: int = 14) -> list[str]:
    """The live allocations by where they were made (pronghorn's frames; ``_record_memory_history`` must be on)
    and by pool, largest first: what held the memory when a budgeted run ran out of it."""
    groups: dict[str, int] = {}
    for seg in torch.cuda.memory._snapshot()["segments"]:
        pool = "graph-pool" if _graph_pool(seg) else "default"
        for b in seg["blocks"]:
            if b["state"] != "active_allocated":
                continue
            frames = [f for f in b.get("frames", []) if "/pronghorn/" in f["filename"]][:3]
            key = pool + " " + (" < ".join(f"{f['filename'].rsplit('/', 1)[-1]}:{f['line']} {f['name']}"
                                           for f in frames) or "(no pronghorn frame)")
            groups[key] = groups.get(key, 0) + b["size"]
    return [f"{v / 2**20:9.1f} MiB  {k}" for k, v in sorted(groups.items(), key=lambda kv: -kv[1])[:top]]


def _first_oom(device: int, alloc: int, device_allocated: int, device_free: int) -> None:
    """At the first allocation that runs out of memory (a retried one too): what it asked for and the live
    allocations by origin, the moment the peak was missed."""
    if getattr(_first_oom, "seen", False):
        return
    _first_oom.seen = True
    print(f"pronghorn memory at the first out-of-memory: asked {alloc / 2**20:.1f} MiB with {device_allocated / 2**30:.3f}"
          f" GiB allocated, {device_free / 2**20:.1f} MiB free; live allocations by origin:\n" + "\n".join(live_blocks()),
          file=sys.stderr, flush=True)


def _phase_peak(phases: dict, name: str, device: str, held: str | None = None) -> None:
    """The peak allocated since the last call into ``phases[name]`` (and what stays allocated after it into
    ``phases[held]``), then a fresh peak count: the generation phase (rollouts and scoring) apart from training."""
    if device != "cuda":
        return
    torch.cuda.synchronize()
    phases[name] = max(phases[name], torch.cuda.max_memory_allocated())
    if held:
        phases[held] = max(phases[held], torch.cuda.memory_allocated())
    torch.cuda.reset_peak_memory_stats()


def _trl_config(w: dict, device: str, dtype: torch.dtype, out: str):
    import trl

    return trl.GRPOConfig(output_dir=out, per_device_train_batch_size=w["generations"],
                          gradient_accumulation_steps=w["prompts"], num_generations=w["generations"],
                          max_completion_length=w["new_tokens"], max_steps=w["steps"], learning_rate=1e-6,
                          gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False},
                          bf16=dtype == torch.bfloat16, use_cpu=device == "cpu", report_to="none", logging_steps=1,
                          save_strategy="no", disable_tqdm=True, seed=0, beta=0.0, loss_type="dapo", use_vllm=False)


def _run_trl_trainer(model, tok, w: dict, device: str, args, peft_config=None) -> dict:
    import datasets
    import trl

    steps: list[float] = []
    gens: list[float] = []

    class Timed(trl.GRPOTrainer):  # the decoder's share of the step, measured around TRL's own generation call
        def _generate_single_turn(self, *a, **k):
            _sync(device)
            t = time.perf_counter()
            result = super()._generate_single_turn(*a, **k)
            _sync(device)
            gens.append(time.perf_counter() - t)
            return result

    rows = [{"prompt": p} for p in _prompts(w["prompts"], w["prompt_len"])] * w["steps"]
    trainer = Timed(model=model, reward_funcs=[word_count], args=args, processing_class=tok,
                    train_dataset=datasets.Dataset.from_list(rows), peft_config=peft_config, callbacks=[step_timer(device, steps)])
    trainer.train()
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    return dict(steps=steps, gens=gens, lengths=lengths)


def run_trl(w: dict, device: str, dtype: torch.dtype, out: str) -> dict:
    from peft import LoraConfig
    from transformers import LlamaForCausalLM

    with torch.device(device):
        model = LlamaForCausalLM(_llama_config(w["cfg"])).to(dtype)
    peft_config = LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    return _run_trl_trainer(model, _tokenizer(), w, device, _trl_config(w, device, dtype, out), peft_config)


def run_unsloth(w: dict, device: str, dtype: torch.dtype, out: str) -> dict:
    import unsloth  # noqa: F401  (first: it patches TRL's GRPOTrainer)
    from transformers import LlamaForCausalLM
    from unsloth import FastLanguageModel

    path = Path(out) / "random-llama"
    torch.manual_seed(0)
    LlamaForCausalLM(_llama_config(w["cfg"])).to(dtype).save_pretrained(path)
    _tokenizer().save_pretrained(path)
    model, tok = FastLanguageModel.from_pretrained(str(path), max_seq_length=w["prompt_len"] + w["new_tokens"] + 8,
                                                   dtype=dtype, load_in_4bit=False, fast_inference=False)
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS,
                                             use_gradient_checkpointing="unsloth", random_state=0)
    return _run_trl_trainer(model, tok, w, device, _trl_config(w, device, dtype, out))


def child(system: str, a) -> None:
    w = shape(a)
    device = "cuda" if torch.cuda.is_available() and not a.dry_run else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    budget = {}
    if a.max_memory is not None:  # pronghorn under a budget: max_memory and the process's memory fraction
        budget = dict(max_memory=a.max_memory)
        if device == "cuda":
            total = torch.cuda.get_device_properties(0).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, a.max_memory * 2**30 / total))
            if os.environ.get("GRPO_MEMORY_HISTORY"):  # live_blocks() by origin on running out of memory (slower)
                torch.cuda.memory._record_memory_history(max_entries=100_000)
                torch._C._cuda_attach_out_of_memory_observer(_first_oom)  # also when the trainer retries it
    with tempfile.TemporaryDirectory() as out:
        try:
            r = {"pronghorn": run_pronghorn, "trl+peft": run_trl, "unsloth": run_unsloth}[system](w, device, dtype,
                                                                                                     out, **budget)
        except torch.OutOfMemoryError:
            if budget and device == "cuda":
                print("pronghorn memory at the failure, live allocations by origin:\n" + "\n".join(live_blocks()),
                      file=sys.stderr, flush=True)
            raise
    tail = slice(1, None) if len(r["steps"]) > 1 else slice(None)
    step, gen = statistics.median(r["steps"][tail]), statistics.median(r["gens"][tail])
    peak = round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None
    phases = {f"peak_{k}_gib": round(v / 2**30, 2) for k, v in (r.get("phases") or {}).items()}
    if phases:  # pronghorn counts its peak per phase (the counter is reset between them)
        peak = max(peak, phases["peak_generation_gib"], phases["peak_training_gib"])
    completions = w["prompts"] * w["generations"]
    print(json.dumps(dict(system=system if a.max_memory is None else f"{system}@{a.max_memory}GiB", workload="tiny" if a.dry_run else a.workload, device=device,
                          completions=completions, new_tokens=w["new_tokens"], step_s=round(step, 3),
                          generation_s=round(gen, 3), training_s=round(step - gen, 3),
                          steps_per_s=round(1 / step, 4), mean_length=round(statistics.mean(r["lengths"]), 1),
                          peak_gib=peak, **phases, **({"generation_plan": r["generation"]} if r.get("generation")
                                                         else {}))))


def available(system: str, dry_run: bool) -> str | None:
    """None when the system can run here, else why not."""
    need = {"trl+peft": ["trl", "peft", "datasets"], "unsloth": ["unsloth", "trl", "datasets"]}
    missing = [m for m in need.get(system, []) if importlib.util.find_spec(m) is None]
    if missing:
        return f"not installed: {', '.join(missing)}"
    if system == "unsloth" and (dry_run or not torch.cuda.is_available()):
        return "Unsloth needs a CUDA GPU"
    return None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workload", default="llama-3.2-1b", choices=sorted(WORKLOADS))
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--generations", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--json", default="grpo.json")
    ap.add_argument("--dry-run", action="store_true", help="a tiny model on the CPU, 3 steps (the pipeline only)")
    ap.add_argument("--pronghorn-budget", default=None, help="a system of --systems (run before), or GiB: pronghorn once "
                    "more under that system's measured peak as max_memory")
    ap.add_argument("--child", choices=SYSTEMS, help=argparse.SUPPRESS)
    ap.add_argument("--max-memory", type=float, default=None, help=argparse.SUPPRESS)  # GiB, the child's budget
    a = ap.parse_args()
    if a.child:
        return child(a.child, a)
    rows = []
    systems = a.systems.split(",") + (["pronghorn@budget"] if a.pronghorn_budget else [])
    for system in systems:
        extra = []
        if system == "pronghorn@budget":
            peer = next((r for r in rows if r["system"] == a.pronghorn_budget and r.get("peak_gib")), None)
            if peer is None and not _is_number(a.pronghorn_budget):
                print(f"skip pronghorn under {a.pronghorn_budget}'s peak: no peak measured", flush=True)
                continue
            system, extra = "pronghorn", ["--max-memory", str(peer["peak_gib"] if peer else a.pronghorn_budget)]
        why = available(system, a.dry_run)
        if why:
            print(f"skip {system}: {why}", flush=True)
            continue
        argv = [sys.executable, __file__, "--child", system, "--workload", a.workload, "--prompts", str(a.prompts),
                "--generations", str(a.generations), "--new-tokens", str(a.new_tokens), "--steps", str(a.steps),
                *extra]
        proc = subprocess.run(argv + (["--dry-run"] if a.dry_run else []), capture_output=True, text=True)
        line = next((x for x in reversed(proc.stdout.splitlines()) if x.startswith("{")), None)
        if proc.returncode or line is None:
            plans = sorted({x for x in (proc.stdout + proc.stderr).splitlines() if "memory plan" in x})
            plans += [x for x in proc.stderr.splitlines() if x.startswith("pronghorn memory") or " MiB  " in x]
            print(f"{system} failed (exit {proc.returncode}); its memory plans:\n" + "\n".join(plans)
                  + f"\n{proc.stderr[-3000:]}", flush=True)
            rows.append(dict(system=system, error=(proc.stderr.strip().splitlines() or ["?"])[-1], plans=plans))
            continue
        rows.append(json.loads(line))
        print(line, flush=True)
        notes = [x for x in (proc.stdout + proc.stderr).splitlines()
                 if not x.startswith("{") and ("memory plan" in x or x.startswith("pronghorn memory"))]
        if notes:  # a budgeted run's plans, retries and per-phase memory (GRPO_MEMORY_HISTORY)
            print("\n".join(dict.fromkeys(notes)), flush=True)
            rows[-1]["plans"] = list(dict.fromkeys(notes))
    base = next((r for r in rows if r["system"] == "trl+peft" and "step_s" in r), None)
    print(f"\n{'system':<20} {'s/step':>8} {'generation s':>13} {'training s':>11} {'peak GiB':>9} "
          f"{'mean length':>12} {'steps/s vs trl+peft':>20}")
    for r in rows:
        if "step_s" not in r:
            print(f"{r['system']:<20} error: {r['error']}")
            continue
        speed = f"{base['step_s'] / r['step_s']:.2f}x" if base else "-"
        print(f"{r['system']:<20} {r['step_s']:>8} {r['generation_s']:>13} {r['training_s']:>11} "
              f"{str(r['peak_gib']):>9} {r['mean_length']:>12} {speed:>20}")
    for r in rows:
        if "peak_generation_gib" in r:
            print(f"{r['system']}: peak {r['peak_generation_gib']} GiB in generation and scoring "
                  f"({r['peak_held_after_generation_gib']} GiB still allocated after it), "
                  f"{r['peak_training_gib']} GiB in training")
    write_results(a.json, run_meta(dry_run=a.dry_run), rows)


def _is_number(text: str) -> bool:
    try:
        return float(text) > 0
    except ValueError:
        return False


if __name__ == "__main__":
    main()
