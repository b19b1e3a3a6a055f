"""Full fine-tuning on one GPU (issue 17 item 5): pronghorn beside Hugging Face Trainer full fine-tuning and Unsloth's
``full_finetuning=True``, and LoRA + embed_tokens + lm_head (the continued-pretraining setting).

Workloads (random-init weights with the real configs, bf16 weights, random token ids, labels = inputs, constant
learning rate 1e-5, no gradient clipping; tok/s = batch x seq / median step of steps 3..N; peak =
``torch.cuda.max_memory_allocated()``, reset after the model is built):

- ``1b-full``: Llama-3.2-1B config, every weight trains, batch 4 x 2048;
- ``8b-full-8bit``: Llama-3.1-8B config, every weight trains with 8-bit AdamW (bitsandbytes), batch 1 x 2048;
- ``8b-lora-embed``: Llama-3.1-8B config, LoRA r=16 on q,k,v,o,gate,up,down plus embed_tokens and lm_head trained
  fully (embedding learning rate a tenth), batch 2 x 2048.

Systems, each point its own process with a timeout:

- ``pronghorn``: the native trainer's step (``Trainer.train_step``: memory plan "auto", the fused loss) with the
  optimizer each row names: ``adamw_bf16_sr`` (the default for bf16 weights), ``adamw_bf16_sr_bf16_moments``,
  ``adamw_8bit``; ``+inbwd``:
  ``optimizer_in_backward`` (no full set of gradients); ``@hf0.6``: ``max_memory`` set to 0.6 x hf-trainer's peak
  on the workload in the same run (the issue's memory target; the plan recomputes what it must);
- ``hf-trainer``: ``transformers.Trainer`` on ``LlamaForCausalLM`` (SDPA), ``bf16=True``, gradient checkpointing
  on, ``optim`` adamw_torch_fused (bf16 moments) or adamw_bnb_8bit; for LoRA PEFT with ``modules_to_save``;
- ``unsloth``: ``FastLanguageModel.from_pretrained(full_finetuning=True, use_gradient_checkpointing="unsloth")``
  (LoRA: ``get_peft_model`` with embed_tokens, lm_head) in a plain loop with torch's fused AdamW or
  bitsandbytes' AdamW8bit; skipped when unsloth does not import.

    python benchmarks/full_finetune.py --json $OUT/full_ft.json                 # every workload (H200: ~10 min)
    python benchmarks/full_finetune.py --workloads 1b-full --systems pronghorn,hf-trainer
    python benchmarks/full_finetune.py --dry-run                                 # tiny sizes on the CPU
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

_REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(_REPO))
from memory_budget import CONFIGS, PEER_SCRIPTS, _checkpoint_dir, _peak_bytes, _run  # noqa: E402  (also fixes sys.path)
from common import run_meta, write_results  # noqa: E402
from train_e2e import TARGETS  # noqa: E402

_GIB = 2**30
LR = 1e-5
# pronghorn's rows: optim, "+inbwd": optimizer_in_backward, "@hf0.6": max_memory = 0.6 x hf-trainer's peak on the
# workload in this run (the target), so the memory plan recomputes what it must to fit
_FULL = ["adamw_bf16_sr", "adamw_bf16_sr+inbwd", "adamw_8bit+inbwd", "adamw_bf16_sr_bf16_moments+inbwd",
         "adamw_bf16_sr+inbwd@hf0.6", "adamw_bf16_sr_bf16_moments+inbwd@hf0.6", "adamw_8bit+inbwd@hf0.6"]
WORKLOADS = {  # name: (model, batch, seq, kind, the peers' optimizer, pronghorn's rows)
    "1b-full": ("llama-3.2-1b", 4, 2048, "full", "adamw_torch_fused", _FULL),
    "8b-full-8bit": ("llama-3.1-8b", 1, 2048, "full", "adamw_8bit", ["adamw_8bit+inbwd", "adamw_8bit"]),
    "8b-lora-embed": ("llama-3.1-8b", 2, 2048, "lora-embed", "adamw_torch_fused", ["adamw_torch_fused"]),
    "tiny-full": ("tiny", 2, 128, "full", "adamw_torch_fused", _FULL),  # --dry-run
    "tiny-lora-embed": ("tiny", 2, 128, "lora-embed", "adamw_torch_fused", ["adamw_torch_fused"]),
}
SYSTEMS = ("hf-trainer", "pronghorn", "unsloth")


# --- one point, in its own process ---

def _random_ids(spec: dict, device: str) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randint(0, CONFIGS[spec["model"]]["vocab_size"], (spec["batch"], spec["seq"]), device=device)


def _time_steps(step, steps: int, cuda: bool) -> list[float]:
    times = []
    for i in range(steps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step(i)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def _pronghorn(spec: dict, device: str, dtype: torch.dtype) -> tuple[list[float], float]:
    from pronghorn.models.builder import init_random_model
    from pronghorn.models.config import ModelConfig
    from pronghorn.models.lora import LoRAConfig, attach_lora
    from pronghorn.train.config import TrainConfig
    from pronghorn.train.full_finetune import make_full_finetuning
    from pronghorn.train.trainer import Trainer

    config = ModelConfig.from_hf_dict({"model_type": "llama", "hidden_act": "silu", "rms_norm_eps": 1e-5,
                                       **CONFIGS[spec["model"]]})
    model = init_random_model(config, dtype, device)
    optim, _, inbwd = spec["optim"].split("@")[0].partition("+")
    if spec["kind"] == "full":
        make_full_finetuning(model)
    else:
        attach_lora(model, LoRAConfig(r=16, lora_alpha=16, target_modules=TARGETS + ["embed_tokens", "lm_head"]))
    budget = spec.get("budget_gib")
    model.gradient_checkpointing_enable(mode="auto", max_memory=f"{budget}GiB" if budget else "none")
    examples = [{"input_ids": row, "labels": row} for row in _random_ids(spec, device).tolist()]  # the peers' batch

    class Tok:
        pad_token_id, eos_token_id = 0, 0

    cfg = TrainConfig(output_dir=spec["tmp"], progress=False, batch_size=spec["batch"], gradient_accumulation_steps=1,
                      learning_rate=LR, lr_scheduler="constant", max_grad_norm=0.0, optim=optim,
                      optimizer_in_backward=bool(inbwd), max_steps=spec["steps"], max_length=spec["seq"],
                      embedding_learning_rate=LR / 10 if spec["kind"] == "lora-embed" else None)
    t = Trainer(model, Tok(), examples, cfg, base_name="random")
    model.train()
    losses = []
    step = lambda i: losses.append(t.train_step(examples)[0])  # noqa: E731
    _reset_peak(device)
    times = _time_steps(step, spec["steps"], device == "cuda")
    plan = model.memory_plan
    EXTRA.update(plan=plan.summary(), est_gib=round(plan.estimate_bytes / _GIB, 2))
    return times, losses[-1]


def _hf_trainer(spec: dict, device: str, dtype: torch.dtype) -> tuple[list[float], float]:
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

    cuda = device == "cuda"
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**CONFIGS[spec["model"]], attn_implementation="sdpa")).to(dtype)
    if spec["kind"] == "lora-embed":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS,
                                                 modules_to_save=["embed_tokens", "lm_head"], task_type="CAUSAL_LM"))
    ids = _random_ids(spec, "cpu")
    rows = [{"input_ids": ids[i % spec["batch"]], "labels": ids[i % spec["batch"]]}
            for i in range(spec["batch"] * spec["steps"])]
    times, losses, t0 = [], [], [0.0]

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            t0[0] = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0[0])

        def on_log(self, args, state, control, logs=None, **kw):
            losses.extend([logs["loss"]] if logs and "loss" in logs else [])

    optim = {"adamw_8bit": "adamw_bnb_8bit"}.get(spec["peer_optim"], spec["peer_optim"])
    args = TrainingArguments(output_dir=spec["tmp"], per_device_train_batch_size=spec["batch"], max_steps=spec["steps"],
                             learning_rate=LR, lr_scheduler_type="constant", max_grad_norm=0.0, optim=optim,
                             gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False},
                             bf16=cuda, use_cpu=not cuda, report_to=[], save_strategy="no", logging_steps=1,
                             dataloader_num_workers=0, remove_unused_columns=False, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=rows, callbacks=[Clock()])
    _reset_peak(device)
    trainer.train()
    return times, losses[-1] if losses else float("nan")


def _unsloth(spec: dict, device: str, dtype: torch.dtype) -> tuple[list[float], float]:
    from unsloth import FastLanguageModel  # first: it patches transformers when imported

    full = spec["kind"] == "full"
    model, _ = FastLanguageModel.from_pretrained(spec["dir"], max_seq_length=spec["seq"], dtype=dtype,
                                                 load_in_4bit=False, full_finetuning=full,
                                                 use_gradient_checkpointing="unsloth")
    if not full:
        model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, lora_dropout=0, bias="none",
                                                 target_modules=TARGETS + ["embed_tokens", "lm_head"],
                                                 use_gradient_checkpointing="unsloth", max_seq_length=spec["seq"])
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if spec["peer_optim"] == "adamw_8bit":
        import bitsandbytes as bnb

        opt = bnb.optim.AdamW8bit(params, lr=LR)
    else:
        opt = torch.optim.AdamW(params, lr=LR, fused=True)
    ids, losses = _random_ids(spec, device), []

    def step(_):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))

    _reset_peak(device)
    return _time_steps(step, spec["steps"], device == "cuda"), losses[-1]


EXTRA: dict = {}  # what a runner adds to its row (pronghorn: the memory plan and its estimate)
RUNNERS = {"pronghorn": _pronghorn, "hf-trainer": _hf_trainer, "unsloth": _unsloth}


def _reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _child(spec: dict) -> None:
    """Run one point and print ``RESULT {json}``."""
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    out = dict(status="ok")
    try:
        times, loss = RUNNERS[spec["system"]](spec, device, dtype)
        steady = sorted(times[2:] or times)
        step_s = steady[len(steady) // 2]
        out.update(step_s=round(step_s, 4), tok_s=round(spec["batch"] * spec["seq"] / step_s), loss=round(loss, 4),
                   **EXTRA)
    except torch.OutOfMemoryError as e:
        out.update(status="oom", message=str(e).splitlines()[0][:300])
    except Exception as e:  # recorded as a row; the sweep goes on
        out.update(status="error", message=f"{type(e).__name__}: {str(e)[:400]}")
    out["peak_gib"] = round(_peak_bytes(cuda) / _GIB, 2)
    print("RESULT " + json.dumps(out), flush=True)


# --- the parent ---

def _points(workloads: list[str], systems: list[str], rows: list[str] | None = None) -> list[dict]:
    points = []
    for w in workloads:
        model, batch, seq, kind, peer_optim, ours = WORKLOADS[w]
        base = dict(workload=w, model=model, batch=batch, seq=seq, kind=kind, peer_optim=peer_optim)
        for s in systems:
            optims = [o for o in ours if rows is None or o in rows] if s == "pronghorn" else [peer_optim]
            points += [dict(base, system=s, optim=o) for o in optims]
    return points


def _budget(pt: dict, rows: list[dict]) -> tuple[float | None, str | None]:
    """(max_memory in GiB for a pronghorn row's "@hf<f>" suffix, or why there is none)."""
    _, _, label = pt["optim"].partition("@")
    if not label:
        return None, None
    hf = next((r for r in rows if r["workload"] == pt["workload"] and r["system"] == "hf-trainer"
               and r["status"] == "ok"), None)
    if hf is None:
        return None, "no hf-trainer peak on this workload in this run (run hf-trainer first)"
    return round(float(label.removeprefix("hf")) * hf["peak_gib"], 2), None


def _run_point(pt: dict, a, env: dict, rows: list[dict]) -> dict:
    if pt["system"] == "unsloth" and importlib.util.find_spec("unsloth") is None:
        return dict(pt, status="skipped", message="unsloth does not import here")
    budget, why = _budget(pt, rows)
    if why:
        return dict(pt, status="skipped", message=why)
    pt = dict(pt, budget_gib=budget)
    spec = dict(pt, steps=a.steps, tmp=tempfile.mkdtemp(prefix="fullft-"))
    if pt["system"] == "unsloth":
        spec["dir"] = _checkpoint_dir(pt["model"], Path(env["BENCH_MODELS"]), a.peer_scripts)
    rc, out, err = _run([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)], a.timeout, env,
                        cwd=env["BENCH_MODELS"])  # Unsloth writes its compile cache to cwd
    found = [json.loads(line[7:]) for line in out.splitlines() if line.startswith("RESULT ")]
    if found:
        return dict(pt, **found[-1])
    last = [line for line in err.splitlines() if line.strip()][-1:] or ["(no output)"]
    return dict(pt, status="timeout" if rc is None else "error", message=last[0][:400])


def _print_table(rows: list[dict]) -> None:
    ref = {r["workload"]: r for r in rows if r["system"] == "hf-trainer" and r["status"] == "ok"}
    print(f"\n{'workload':<16} {'system':<11} {'optim':<26} {'tok/s':>9} {'peak GiB':>9} {'speed':>7} {'memory':>7}")
    for r in rows:
        base, ok = ref.get(r["workload"]), r["status"] == "ok"
        speed = f"{r['tok_s'] / base['tok_s']:.2f}x" if ok and base else "-"
        mem = f"{r['peak_gib'] / base['peak_gib']:.2f}x" if ok and base and base["peak_gib"] else "-"
        tok = f"{r['tok_s']:,}" if ok else r["status"]
        note = f"  max_memory {r['budget_gib']} GiB" if r.get("budget_gib") else ""
        print(f"{r['workload']:<16} {r['system']:<11} {r['optim']:<26} {tok:>9} {str(r.get('peak_gib')):>9} "
              f"{speed:>7} {mem:>7}" + (note if ok else f"  {r.get('message', '')[:90]}"))
    print("(speed and memory relative to hf-trainer on the same workload)")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--workloads", default="1b-full,8b-full-8bit,8b-lora-embed")
    ap.add_argument("--systems", default=",".join(SYSTEMS), help="hf-trainer first: pronghorn's @hf0.6 rows "
                    "take their budget from its peak")
    ap.add_argument("--rows", default=None, help="pronghorn's rows to run, comma-separated (default: every row of "
                    f"the workload, e.g. {','.join(_FULL[:2])})")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--timeout", type=float, default=400.0, help="seconds per point")
    ap.add_argument("--peer-scripts", type=Path, default=PEER_SCRIPTS, help="unsloth_bench.py (makes checkpoints)")
    ap.add_argument("--dry-run", action="store_true", help="tiny workloads, 3 steps, on the CPU")
    ap.add_argument("--json", default=None, help="results file (default full_finetune.json)")
    a = ap.parse_args(argv)
    if a.child:
        return _child(json.loads(a.child))
    cuda = torch.cuda.is_available()
    if a.dry_run:
        a.workloads, a.steps = "tiny-full,tiny-lora-embed", 3
        a.json = a.json or str(Path(tempfile.mkdtemp()) / "full_finetune_dry.json")
    elif not cuda:
        raise SystemExit("no CUDA device: run with --dry-run on a CPU")
    a.json = a.json or "full_finetune.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(_REPO), os.environ.get("PYTHONPATH", "")]),
           "BENCH_MODELS": os.environ.get("BENCH_MODELS", tempfile.mkdtemp(prefix="bench-models-"))}
    rows = []
    for pt in _points(a.workloads.split(","), a.systems.split(","), a.rows.split(",") if a.rows else None):
        rows.append(_run_point(pt, a, env, rows))
        print(json.dumps(rows[-1]), flush=True)
        write_results(a.json, run_meta(steps=a.steps, lr=LR, peak="max_memory_allocated" if cuda else
                                       "max RSS (CPU dry run)", argv=sys.argv[1:]), rows)
    _print_table(rows)


if __name__ == "__main__":
    main()
