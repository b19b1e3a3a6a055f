"""Speed against memory: pronghorn under a memory budget beside HF + PEFT, HF + PEFT + Liger and Unsloth (issue 15).

The peers' workloads (../shared/bench/README.md): random-init weights with the real configs, bf16, LoRA r=16
alpha=16 dropout 0 on q,k,v,o,gate,up,down, random tokens, labels = inputs, ``torch.optim.AdamW``, median step of
steps 3..8; tok/s = batch x seq / step; peak = ``torch.cuda.max_memory_allocated()`` (pronghorn's over steps 3..8,
plus its replay graphs' pool, ``common.peak_bytes``; steps 1-2 as ``warmup_peak_gib``). pronghorn runs through its
public API in a plain loop:
``FastLanguageModel.from_pretrained(<HF checkpoint dir>)`` then ``get_peft_model(...,
use_gradient_checkpointing="auto", max_memory=<budget>)``, forward with labels, backward, AdamW; with and without
``torch.autocast`` (``--autocast``). The budget reaches it as ``max_memory`` and/or as the process cap
``torch.cuda.set_per_process_memory_fraction`` (``--cap-mode``). The peers run their own scripts unchanged
(``--peer-scripts``: ../shared/bench, or .benchwheels/bench on the GPU machine): at no cap, and under the process
cap in the scenarios.

Every point is its own process (caps and allocator state don't leak) with a timeout; an out-of-memory or a
pronghorn error ("does not fit") is a row with its message. Budgets (GiB): numbers, ``none``, ``unsloth``
(Unsloth's measured peak on that workload in this run, else its README peak), ``leanest`` (1.05 x the peak of
pronghorn's offload mode, every layer input on the host). Points run most important first: Unsloth and
pronghorn at no cap, then at Unsloth's peak, then the leanest, the other peers, the other budgets, the
scenarios; a budget above pronghorn's own peak at no cap is skipped (the same point). Points that would start
after ``--time-limit`` are skipped, so one device command ends in time; the JSON is rewritten after each point.

On the GPU machine (carry .benchwheels: the peers' wheels and scripts; its README has the untar line), one
workload a call (a point: ~15-25 s for pronghorn 1B, ~30-45 s for 8B, ~1-1.5 min for Unsloth, by estimate):

    python benchmarks/memory_budget.py --workloads 1b-lora --json $OUT/mb.json       # ~4-5 min
    python benchmarks/memory_budget.py --scenarios all --workloads "" --json $OUT/sc.json
    python benchmarks/memory_budget.py --budgets full --systems pronghorn            # 4..48 GiB + leanest, unsloth
    python benchmarks/memory_budget.py --dry-run      # the whole pipeline on a tiny model on the CPU, no peers

The family rows (issue 16 item 7; acceptance per row: no cap >= 1.3x Unsloth, at Unsloth's peak >= 1.0x, which the
summary marks): ``gemma2-9b-qlora`` (Gemma-2-9B config, QLoRA, 2 x 2048), ``phi3.5-mini-lora`` (Phi-3.5-mini, LoRA,
4 x 2048), ``gemma3-4b-lora`` (Gemma-3-4B's text model, LoRA, 2 x 2048: the issue names no batch), ``families`` for
all three. Their configs and checkpoint dirs (random init, word-level tokenizer of the config's vocabulary) come
from family_configs.py; the peers run our scripts in peers/ on that dir (``unsloth_any.py``, ``hf_any.py``; Phi-3's
adapters on the fused ``qkv_proj`` / ``gate_up_proj`` there, on the split q,k,v / gate,up in pronghorn; no Liger).
One family a call (checkpoint 8-19 GB written first, then ~6 points; estimate 6-9 min):

    python benchmarks/memory_budget.py --workloads gemma2-9b-qlora --budgets unsloth,none \
        --systems pronghorn,unsloth,hf+peft --peer-scripts .benchwheels/bench     # gpu_session.sh families-gemma2
    python benchmarks/memory_budget.py --dry-run --workloads tiny-families       # tiny versions, CPU, pronghorn
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import io
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

_REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(_REPO))  # this tree's pronghorn, whatever is installed (the children get it on PYTHONPATH)
from common import median_ms, peak_bytes, run_meta, write_results  # noqa: E402
from family_configs import FAMILY_CONFIGS  # noqa: E402
from train_e2e import TARGETS  # noqa: E402
from train_e2e import WORKLOADS as E2E  # noqa: E402

_GIB = 2**30
PEER_SCRIPTS = next((p for p in (_REPO / "shared/bench", _REPO.parent / "shared/bench", Path("/work/shared/bench"),
                               _REPO / ".benchwheels/bench")  # the GPU machine: carried with the peers' wheels
                     if (p / "hf_baseline.py").is_file()), _REPO.parent / "shared/bench")
CONFIGS = {"llama-3.2-1b": E2E["llama-3.2-1b"][0], "llama-3.1-8b": E2E["llama-3.1-8b"][0], "tiny": E2E["tiny"][0],
           **FAMILY_CONFIGS}  # the families' entries name their model_type
WORKLOADS = {  # name: (model, batch, seq, QLoRA)
    "1b-lora": ("llama-3.2-1b", 4, 2048, False),
    "8b-lora": ("llama-3.1-8b", 2, 2048, False),
    "8b-qlora": ("llama-3.1-8b", 2, 2048, True),
    "tiny": ("tiny", 2, 128, False),  # --dry-run
    # issue 16 item 7: one row per family (Gemma 3: the issue names no batch; 2 x 2048 as Gemma 2)
    "gemma2-9b-qlora": ("gemma-2-9b", 2, 2048, True),
    "phi3.5-mini-lora": ("phi-3.5-mini", 4, 2048, False),
    "gemma3-4b-lora": ("gemma-3-4b", 2, 2048, False),
    "tiny-gemma2": ("tiny-gemma2", 2, 128, True),  # --dry-run --workloads tiny-families
    "tiny-phi3": ("tiny-phi3", 2, 128, False),
    "tiny-gemma3": ("tiny-gemma3", 2, 128, False),
}
GROUPS = {"families": "gemma2-9b-qlora,phi3.5-mini-lora,gemma3-4b-lora",
          "tiny-families": "tiny-gemma2,tiny-phi3,tiny-gemma3"}
SCENARIOS = {  # consumer cards: name: (model, batch, seq, QLoRA, cap GiB)
    "8b-qlora-1x8192@16": ("llama-3.1-8b", 1, 8192, True, 16),
    "8b-lora-2x4096@24": ("llama-3.1-8b", 2, 4096, False, 24),
    "1b-lora-8x4096@8": ("llama-3.2-1b", 8, 4096, False, 8),
}
UNSLOTH_README_PEAK = {"1b-lora": 3.65, "8b-lora": 16.68, "8b-qlora": 7.04}  # H200, 2026-12-04
QUICK, FULL = "leanest,unsloth,16,none", "leanest,unsloth,4,6,8,12,16,24,32,48,none"
SYSTEMS = ("pronghorn", "unsloth", "hf+peft", "hf+peft+liger")


# --- one point, in its own process ---

def _plan_estimate(model) -> tuple[float | None, str | None]:
    """The memory plan's estimated peak (bytes) and its one-line summary, where the model exposes a plan:
    ``memory_plan`` (issue 15) on the model or its decoder, else the decoder's last auto plan."""
    for owner in (model, getattr(model, "model", None)):
        plan = getattr(owner, "memory_plan", None)
        if plan is None and owner is not None:
            plans = owner.__dict__.get("_checkpoint_plans")
            plan = list(plans.values())[-1] if plans else None
        if plan is None:
            continue
        summary = plan.summary() if callable(getattr(plan, "summary", None)) else str(plan)[:300]
        for name in ("estimate_bytes", "estimated_bytes", "peak_bytes", "need_bytes"):
            value = getattr(plan, name, None)
            value = value() if callable(value) else value
            if isinstance(value, (int, float)):
                return float(value), summary
        return None, summary
    return None, None


def _peak_bytes(cuda: bool, model=None) -> int:
    if cuda:
        return peak_bytes(model)  # the replay graphs' pool included
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # CPU smoke: the process's max RSS


def _phase_times(model, opt, ids, device: str, autocast: bool, steps: int = 3) -> dict:
    """Median wall ms of a step's forward, backward and optimizer step, each waited for (unprofiled: where a
    budget's cost lands; the waits between phases remove their overlap, so the sum exceeds a timed step)."""
    def wait():
        if device == "cuda":
            torch.cuda.synchronize()

    times = {"forward": [], "backward": [], "optimizer": []}
    for _ in range(steps):
        wait()
        t0 = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=ids, labels=ids).loss
        wait()
        t1 = time.perf_counter()
        loss.backward()
        wait()
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        wait()
        t3 = time.perf_counter()
        for k, (a, b) in zip(times, ((t0, t1), (t1, t2), (t2, t3))):
            times[k].append((b - a) * 1e3)
    return {k: round(sorted(v)[len(v) // 2], 2) for k, v in times.items()}


def _child(spec: dict) -> None:
    """Train one pronghorn point and print ``RESULT {json}``."""
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    budget = spec["budget_gib"]
    out = dict(status="ok", message="")
    if budget is not None and cuda and spec["cap_mode"] in ("fraction", "both"):
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, budget * _GIB / total))
    from pronghorn import FastLanguageModel, PronghornError

    kwargs = {}
    if spec["cap_mode"] in ("kwarg", "both"):
        if "max_memory" in inspect.signature(FastLanguageModel.get_peft_model).parameters:
            kwargs["max_memory"] = None if budget is None else int(budget * _GIB)
        elif spec["cap_mode"] == "kwarg" and budget is not None:
            out.update(status="unsupported", message="get_peft_model takes no max_memory in this checkout")
            print("RESULT " + json.dumps(out), flush=True)
            return
    out["max_memory_passed"] = "max_memory" in kwargs
    model, stage, t0 = None, "load", time.perf_counter()
    try:
        model, _ = FastLanguageModel.from_pretrained(spec["dir"], max_seq_length=spec["seq"], dtype=torch.bfloat16,
                                                     load_in_4bit=spec["q4"], device=device)
        stage = "get_peft_model"
        model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, lora_dropout=0, bias="none",
                                                 target_modules=TARGETS, use_gradient_checkpointing=spec["gc"],
                                                 random_state=3407, max_seq_length=spec["seq"], **kwargs)
        # how a replayed layer runs (whole | split; auto: the plan's choice) and which layers may run as CUDA
        # graphs: the model's planner settings
        model.gradient_checkpointing_enable(mode=spec["gc"], replay=spec.get("replay", "auto"),
                                            replay_graphs=spec.get("replay_graphs", "auto"),
                                            kept_graphs=spec.get("kept_graphs", "auto"))
        if spec.get("levers") == "off":  # session 18's ablation: no step store, fp32 adapter grads by a cast
            from pronghorn.kernels import lora_math
            model.model.step_operands = None
            lora_math._OUT_DTYPE[0] = False
        out["build_s"] = round(time.perf_counter() - t0, 1)
        stage = "step"
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        torch.manual_seed(0)
        ids = torch.randint(0, CONFIGS[spec["model"]]["vocab_size"], (spec["batch"], spec["seq"]), device=device)
        losses = []

        def step():
            with torch.autocast(device, dtype=torch.bfloat16, enabled=spec["autocast"]):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.detach())

        for _ in range(2):  # warm-up: the first plan, the optimizer's state, the replay graphs' captures
            step()
        if cuda:  # the peak of the steady steps (a graph's capture allocates for real, then leaves the pool)
            torch.cuda.synchronize()
            out["warmup_peak_gib"] = round(torch.cuda.max_memory_allocated() / _GIB, 3)
            torch.cuda.reset_peak_memory_stats()
        ms = median_ms(step, iters=spec["steps"] - 2, warmup=0)  # median of steps 3..N
        out.update(step_s=round(ms / 1e3, 4), tok_s=round(spec["batch"] * spec["seq"] / (ms / 1e3)),
                   loss_first=round(float(losses[0]), 4), loss_last=round(float(losses[-1]), 4))
        if spec.get("profile"):  # after the timed steps: the profiler touches neither tok/s nor the peak
            from step_profile import limit, profile_steps, sync_sources
            out["profile"] = profile_steps(step, steps=2)
            out["profile"]["sync_sources"] = sync_sources(step)
            out["profile"]["phases_ms"] = _phase_times(model, opt, ids, device, spec["autocast"])
            out["limit"] = limit(out["profile"])
    except torch.OutOfMemoryError as e:
        out.update(status="oom", message=f"{stage}: {str(e).splitlines()[0][:300]}")
    except PronghornError as e:
        fit = re.search(r"fit|budget|memory|GiB", str(e), re.I)
        out.update(status="does-not-fit" if fit else "error", message=f"{stage}: {type(e).__name__}: {e}"[:600])
    except Exception as e:  # recorded, and the sweep goes on
        out.update(status="error", message=f"{stage}: {type(e).__name__}: {str(e)[:400]}")
    out["peak_gib"] = round(_peak_bytes(cuda, model) / _GIB, 3)
    if cuda:
        out["reserved_gib"] = round(torch.cuda.max_memory_reserved() / _GIB, 3)
        decoder = getattr(model, "model", None)
        for name, key in (("graphs", "graph_pool_gib"), ("kept_graphs", "kept_pool_gib")):
            graphs = getattr(decoder, name, None)
            out[key] = round(graphs.pool_bytes() / _GIB, 3) if graphs is not None else 0.0
    est, summary = _plan_estimate(model) if model is not None else (None, None)
    out.update(est_gib=None if est is None else round(est / _GIB, 3), plan=summary)
    if est is not None and out["status"] == "ok" and out["peak_gib"]:
        out["est_over_peak"] = round(est / _GIB / out["peak_gib"], 3)  # issue 15: within 10%
    print("RESULT " + json.dumps(out), flush=True)


# --- the parent: checkpoints, points, subprocesses ---

def _checkpoint_dir(model: str, root: Path, peers: Path) -> str:
    """A random-init HF checkpoint dir of ``model`` (config + bf16 safetensors + tokenizer), written once: by the
    peers' own script for their Llama configs (so every system loads the same files), else by family_configs.py in
    its own process."""
    d = root / model
    if (d / "config.json").is_file():
        return str(d)
    if model in FAMILY_CONFIGS or model == "tiny" or not (peers / "unsloth_bench.py").is_file():
        root.mkdir(parents=True, exist_ok=True)
        cmd = [str(Path(__file__).with_name("family_configs.py")), str(d),
               json.dumps({"model_type": "llama", **CONFIGS[model]})]
    else:
        cmd = [str(peers / "unsloth_bench.py"), "--model", model, "--make", "1"]
    subprocess.run([sys.executable, *cmd], check=True, env={**os.environ, "BENCH_MODELS": str(root)})
    return str(d)


def _run(cmd: list[str], timeout: float, env: dict, cwd: str | None = None) -> tuple[int | None, str, str]:
    """(exit code or None on timeout, stdout, stderr) of ``cmd`` in a new process group, killed whole on timeout."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd,
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
        return p.returncode, out, err
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        return None, out, err


_CAP = ("import runpy, sys, torch; torch.cuda.set_per_process_memory_fraction(float(sys.argv[1])); "
        "sys.argv = sys.argv[2:]; runpy.run_path(sys.argv[0], run_name='__main__')")


def _peer_point(pt: dict, a, env: dict, timeout: float) -> dict:
    """A peer's own script on the point: ../shared/bench's for the Llama configs, peers/*_any.py for the families."""
    unsloth = pt["system"] == "unsloth"
    if pt["model"] in FAMILY_CONFIGS:
        script = Path(__file__).resolve().parent / "peers" / ("unsloth_any.py" if unsloth else "hf_any.py")
        which = ["--dir", pt["dir"]]
    else:
        script = a.peer_scripts / ("unsloth_bench.py" if unsloth else "hf_baseline.py")
        which = ["--model", pt["model"]]
    args = [str(script), *which, "--bs", str(pt["batch"]), "--seq", str(pt["seq"]),
            "--steps", str(a.steps), "--q4", str(int(pt["q4"]))] + (["--liger", "1"] if "liger" in pt["system"] else [])
    cmd = [sys.executable] + args
    if pt["budget_gib"] is not None:
        fraction = min(1.0, pt["budget_gib"] * _GIB / torch.cuda.get_device_properties(0).total_memory)
        cmd = [sys.executable, "-c", _CAP, repr(fraction)] + args
    rc, out, err = _run(cmd, timeout, env, cwd=env["BENCH_MODELS"])  # Unsloth writes its compile cache to cwd
    found = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    if found:
        r = found[-1]
        return dict(status="ok", tok_s=r["tok_s"], step_s=r["step_s"], peak_gib=r["peak_gib"], loss_last=r["loss"])
    if rc is None:
        return dict(status="timeout", message=f"killed after {timeout:.0f} s")
    text = out + err
    oom = re.findall(r".*(?:OutOfMemoryError|out of memory).*", text)
    lines = [line for line in err.splitlines() if line.strip()]
    last = lines[-1:] or ["(no output)"]
    return dict(status="oom" if oom else "error", message=(oom[-1] if oom else last[0])[:400],
                stderr_tail=lines[-40:])  # a peer's own failure (session 13: Unsloth's Inductor error on Gemma 2)


def _pronghorn_point(pt: dict, a, env: dict, timeout: float) -> dict:
    spec = {k: pt[k] for k in ("model", "batch", "seq", "q4", "gc", "autocast", "budget_gib", "dir")}
    spec.update(cap_mode=a.cap_mode, steps=a.steps, profile=a.profile, replay=a.replay,
                replay_graphs=a.replay_graphs, kept_graphs=a.kept_graphs, levers=a.levers)
    rc, out, err = _run([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)], timeout, env)
    found = [line[7:] for line in out.splitlines() if line.startswith("RESULT ")]
    log = [line for line in out.splitlines() if line.startswith("pronghorn:")][:3]
    if found:
        return {**json.loads(found[-1]), "log": log}
    if rc is None:
        return dict(status="timeout", message=f"killed after {timeout:.0f} s", log=log)
    last = [line for line in err.splitlines() if line.strip()][-1:] or ["(no output)"]
    status = "oom" if re.search(r"OutOfMemoryError|out of memory", err) else "error"
    return dict(status=status, message=f"exit {rc}: {last[0][:400]}", log=log)


def _points(a) -> list[dict]:
    """Every point, most important first; budgets stay labels until run (``unsloth``/``leanest`` need results)."""
    budgets = [b.strip() for b in a.budgets.split(",") if b.strip()]
    acs = {"on": [True], "off": [False], "both": [True, False]}[a.autocast]
    wl = [w for w in a.workloads.split(",") if w]
    systems = set(a.systems.split(","))

    def pt(system, w, label, ac=None, gc="auto", scenario=False):
        model, batch, seq, q4 = (SCENARIOS[w] if scenario else WORKLOADS[w])[:4]
        return dict(system=system, workload=w, model=model, batch=batch, seq=seq, q4=q4, budget=label,
                    autocast=ac, gc=gc if system == "pronghorn" else None, scenario=scenario)

    pron = "pronghorn" in systems
    phases = [[], [], [], [], [], []]
    for w in wl:
        q4 = WORKLOADS[w][3]
        if "unsloth" in systems:
            phases[0].append(pt("unsloth", w, "none"))
        phases[0] += [pt("pronghorn", w, "none", ac) for ac in acs if pron]
        phases[1] += [pt("pronghorn", w, "unsloth", ac) for ac in acs if pron and "unsloth" in budgets]
        if pron and "leanest" in budgets:
            phases[2] += [pt("pronghorn", w, "none", ac, gc="offload") for ac in acs]
            phases[2] += [pt("pronghorn", w, "leanest", ac) for ac in acs]
        if pron and "replay-all" in budgets:  # every layer recomputed without a budget: a budget's own cost apart
            phases[2] += [pt("pronghorn", w, "none", ac, gc="on") for ac in acs]
        phases[3] += [pt(s, w, "none") for s in ("hf+peft", "hf+peft+liger") if s in systems and not
                      ((q4 or WORKLOADS[w][0] in FAMILY_CONFIGS) and "liger" in s)]  # Liger: no QLoRA (the
        # peers' table has none), no family rows
        nums = sorted((b for b in budgets if b not in ("none", "unsloth", "leanest", "replay-all")), key=float,
                      reverse=True)
        phases[4] += [pt("pronghorn", w, b, ac) for b in nums for ac in acs if pron]
    for s in [s for s in a.scenarios.split(",") if s]:
        cap = str(SCENARIOS[s][4])
        phases[5] += [pt("pronghorn", s, cap, ac, scenario=True) for ac in acs if pron]
        phases[5] += [pt(p, s, cap, scenario=True) for p in ("unsloth", "hf+peft") if p in systems]
    return [p for phase in phases for p in phase]


def _find(rows, **match):
    return next((r for r in rows if all(r.get(k) == v for k, v in match.items())), None)


def _resolve_budget(pt: dict, rows: list[dict]) -> tuple[float | None, str | None]:
    """(budget GiB or None for no cap, or a reason to skip the point)."""
    label, w = pt["budget"], pt["workload"]
    if label == "none":
        return None, None
    if label == "unsloth":
        u = _find(rows, system="unsloth", workload=w, budget="none", status="ok")
        gib = u["peak_gib"] if u else UNSLOTH_README_PEAK.get(w)
        if gib is None:
            return None, "no Unsloth peak for this workload"
        pt["budget"] = "unsloth" if u else "unsloth(README)"
    elif label == "leanest":
        off = _find(rows, system="pronghorn", workload=w, budget="none", gc="offload", autocast=pt["autocast"],
                    status="ok")
        if off is None or off.get("peak_gib") is None:
            return None, "offload mode did not run, so no leanest peak"
        gib = round(1.05 * off["peak_gib"], 3)  # issue 15: the leanest plan's peak + 5%
    else:
        gib = float(label)
    if pt["system"] == "pronghorn" and not pt["scenario"]:
        free = _find(rows, system="pronghorn", workload=w, budget="none", gc="auto", autocast=pt["autocast"],
                     status="ok")
        if free and free.get("peak_gib") and gib >= 1.1 * free["peak_gib"]:
            return gib, f"above the peak with no cap ({free['peak_gib']} GiB): the same point"
    return gib, None


def _fmt(v, spec=",.0f"):
    return "-" if v is None else format(v, spec)


def _print_table(rows: list[dict]) -> None:
    print(f"\n{'system':<14} {'workload':<20} {'budget':<18} {'ac':<4} {'gc':<8} {'tok/s':>8} {'peak':>7} "
          f"{'est':>7} {'est/pk':>6} {'time':>5}  status")
    for r in rows:
        numeric = re.fullmatch(r"[\d.]+", r["budget"])
        budget = r["budget"] + ("" if r.get("budget_gib") is None or numeric else f" ({r['budget_gib']:.2f})")
        ratio = r["est_gib"] / r["peak_gib"] if r.get("est_gib") and r.get("peak_gib") else None
        ac = {True: "on", False: "off", None: "-"}[r.get("autocast")]
        print(f"{r['system']:<14} {r['workload']:<20} {budget:<18} {ac:<4} {r.get('gc') or '-':<8} "
              f"{_fmt(r.get('tok_s')):>8} {_fmt(r.get('peak_gib'), '.2f'):>7} {_fmt(r.get('est_gib'), '.2f'):>7} "
              f"{_fmt(ratio, '.2f'):>6} {_fmt(r.get('elapsed_s'), '.0f'):>5}  {r['status']}"
              + (f": {r['message'][:90]}" if r.get("message") else ""))


def summary(rows: list[dict]) -> list[str]:
    """The acceptance checks of issue 15 that one run can answer."""
    lines, ok = [], [r for r in rows if r["status"] == "ok" and r.get("tok_s")]
    for w in dict.fromkeys(r["workload"] for r in rows):
        mine = [r for r in ok if r["workload"] == w and r["system"] == "pronghorn"]
        u = next((r for r in ok if r["workload"] == w and r["system"] == "unsloth"), None)
        for ac in (True, False):
            pts = [r for r in mine if r["autocast"] is ac]
            free = _find(pts, budget="none", gc="auto")
            if u and pts:
                under = [r for r in pts if r["peak_gib"] <= u["peak_gib"]]
                best = max(under, key=lambda r: r["tok_s"], default=None)
                lines.append(f"{w} autocast {'on ' if ac else 'off'}: at <= Unsloth's {u['peak_gib']} GiB "
                             + (f"{best['tok_s'] / u['tok_s']:.2f}x Unsloth ({best['budget']}, {best['peak_gib']} GiB)"
                                if best else "no point") + (f"; no cap {free['tok_s'] / u['tok_s']:.2f}x"
                                                            if free else ""))
                if WORKLOADS.get(w, ("",))[0] in FAMILY_CONFIGS:  # issue 16 item 7's bar, per family row
                    passed = (free and free["tok_s"] >= 1.3 * u["tok_s"], best and best["tok_s"] >= u["tok_s"])
                    lines[-1] += (f" [issue 16: no cap >= 1.3x {'yes' if passed[0] else 'NO'}, at Unsloth's "
                                  f"memory >= 1.0x {'yes' if passed[1] else 'NO'}]")
        for r in [r for r in mine if r["autocast"] is False]:
            on = _find(mine, autocast=True, budget=r["budget"], gc=r["gc"])
            if on:
                lines.append(f"{w} {r['gc']} {r['budget']}: no autocast / autocast = {r['tok_s'] / on['tok_s']:.2f}")
        for peer in [r for r in ok if r["workload"] == w and r["system"] != "pronghorn"]:
            above = [r for r in mine if r["peak_gib"] <= peer["peak_gib"] and r["tok_s"] > peer["tok_s"]]
            lines.append(f"{w}: {peer['system']} ({peer['tok_s']:,} tok/s, {peer['peak_gib']} GiB) beaten at <= its "
                         f"memory: {'yes' if above else 'NO'}")
        ooms = [r for r in rows if r["workload"] == w and r["system"] == "pronghorn" and r["status"] == "oom"]
        lines += [f"{w}: pronghorn OOM at budget {r['budget']} (autocast {r['autocast']}): {r['message'][:80]}"
                  for r in ooms]
    return lines


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["workload"] for r in rows))
    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4.5), squeeze=False)
    for ax, w in zip(axes[0], names):
        ok = [r for r in rows if r["workload"] == w and r["status"] == "ok" and r.get("peak_gib") and r.get("tok_s")]
        for ac, style, color in ((True, "o-", "C0"), (False, "s--", "C1")):
            for gc in ("auto", "offload"):
                pts = sorted((r for r in ok if r["system"] == "pronghorn" and r["autocast"] is ac and r["gc"] == gc),
                             key=lambda r: r["peak_gib"])
                if pts:
                    ax.plot([r["peak_gib"] for r in pts], [r["tok_s"] for r in pts], style if gc == "auto" else "x",
                            color=color, label=f"pronghorn {gc}, autocast {'on' if ac else 'off'}")
                    for r in pts:
                        ax.annotate(r["budget"], (r["peak_gib"], r["tok_s"]), fontsize=6, alpha=0.7)
        for r in (r for r in ok if r["system"] != "pronghorn"):
            ax.scatter([r["peak_gib"]], [r["tok_s"]], marker="^", s=50, zorder=3,
                       color=f"C{2 + SYSTEMS.index(r['system'])}")
            ax.annotate(r["system"], (r["peak_gib"], r["tok_s"]), fontsize=8, xytext=(4, -10),
                        textcoords="offset points")
        if w in SCENARIOS:
            ax.axvline(SCENARIOS[w][4], color="grey", ls=":", lw=1)
        model, batch, seq = next(((r["model"], r["batch"], r["seq"]) for r in rows if r["workload"] == w))
        ax.set(title=f"{w}: {model}, {batch}x{seq}", xlabel="peak GiB (max_memory_allocated)", ylabel="tok/s")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    from pronghorn.models.replay_graphs import GRAPH_SETTINGS

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workloads", default=None, help=f"of {list(WORKLOADS)} or {list(GROUPS)} (default: the "
                    "three Llama ones; --dry-run: tiny, or the tiny ones named)")
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--budgets", default=QUICK, help=f"GiB, none, unsloth, leanest, replay-all (no budget, "
                    f"every layer recomputed); 'full' = {FULL}")
    ap.add_argument("--autocast", default="both", choices=("on", "off", "both"), help="pronghorn rows")
    ap.add_argument("--cap-mode", default="both", choices=("kwarg", "fraction", "both"),
                    help="pronghorn: the budget as get_peft_model(max_memory=), the process's memory fraction, both")
    ap.add_argument("--scenarios", default="", help=f"'all' or of {list(SCENARIOS)}")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--replay", default="auto", choices=("auto", "whole", "split"),
                    help="pronghorn points: how a replayed layer runs (auto: the plan picks)")
    ap.add_argument("--replay-graphs", default="auto", choices=GRAPH_SETTINGS,
                    help="pronghorn points: replayed layers (and kept ones) as CUDA graphs where the plan takes them")
    ap.add_argument("--kept-graphs", default="auto", choices=GRAPH_SETTINGS,
                    help="pronghorn points: kept layers as CUDA graphs where the plan takes them")
    ap.add_argument("--levers", default="on", choices=("on", "off"), help="pronghorn points, off: no step store of "
                    "the adapters' operands and fp32 adapter gradients by a cast (session 18's ablation)")
    ap.add_argument("--point-timeout", type=float, default=300)
    ap.add_argument("--time-limit", type=float, default=560, help="seconds: points that would start later are skipped")
    ap.add_argument("--peer-scripts", type=Path, default=PEER_SCRIPTS)
    ap.add_argument("--models-dir", type=Path, default=Path(os.environ.get("BENCH_MODELS", "/tmp/models")))
    ap.add_argument("--json", default=None, help="results (default memory_budget.json); the PNG beside it")
    ap.add_argument("--profile", action="store_true", help="pronghorn points: also profile 2 steps (benchmarks/"
                                                           "step_profile: kernel time by category, top kernels, gaps)")
    ap.add_argument("--dry-run", action="store_true", help="tiny models on the CPU, no peers, made-up budgets")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        return _child(json.loads(a.child))
    cuda = torch.cuda.is_available()
    a.workloads = "1b-lora,8b-lora,8b-qlora" if a.workloads is None else a.workloads
    a.workloads = ",".join(GROUPS.get(w, w) for w in a.workloads.split(","))
    if a.dry_run:
        tiny = all(w.startswith("tiny") for w in a.workloads.split(","))  # else the Llama one
        a.workloads, a.systems, a.scenarios, a.steps = a.workloads if tiny else "tiny", "pronghorn", "", 4
        a.budgets = "leanest,unsloth,0.01,4,none,replay-all"  # 0.01: does not fit; 4: above the uncapped peak (skipped)
        a.models_dir = Path(tempfile.gettempdir()) / "pronghorn-memory-budget-models"
        a.json = a.json or str(Path(tempfile.mkdtemp()) / "memory_budget_dry.json")
    elif not cuda:
        raise SystemExit("no CUDA device: run with --dry-run on a CPU")
    a.budgets = FULL if a.budgets == "full" else a.budgets
    a.scenarios = ",".join(SCENARIOS) if a.scenarios == "all" else a.scenarios
    bad = ([s for s in a.systems.split(",") if s not in SYSTEMS]
           + [w for w in a.workloads.split(",") if w and w not in WORKLOADS]
           + [s for s in a.scenarios.split(",") if s and s not in SCENARIOS])
    if bad:
        raise SystemExit(f"unknown {bad}: systems {SYSTEMS}, workloads {list(WORKLOADS)}, scenarios {list(SCENARIOS)}")
    peers = set(a.systems.split(",")) - {"pronghorn"}
    a.peer_scripts = a.peer_scripts.resolve()  # the peers run in the models' folder
    if peers and not (a.peer_scripts / "hf_baseline.py").is_file():
        raise SystemExit(f"--peer-scripts {a.peer_scripts}: no hf_baseline.py / unsloth_bench.py there")
    a.json = a.json or "memory_budget.json"
    from pronghorn import FastLanguageModel

    kwarg = "max_memory" in inspect.signature(FastLanguageModel.get_peft_model).parameters
    if not kwarg and a.cap_mode != "fraction":
        print("NOTE: FastLanguageModel.get_peft_model takes no max_memory in this checkout: "
              + ("the budget reaches pronghorn as the process's memory fraction only" if a.cap_mode == "both"
                 else "every capped pronghorn point is recorded as 'unsupported'"), flush=True)
    env = {**os.environ, "BENCH_MODELS": str(a.models_dir), "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(_REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    meta = run_meta(device_gib=round(torch.cuda.get_device_properties(0).total_memory / _GIB, 1) if cuda else None,
                    steps=a.steps, cap_mode=a.cap_mode, max_memory_kwarg=kwarg, budgets=a.budgets,
                    peak="max_memory_allocated" if cuda else "max RSS (CPU dry run)", argv=sys.argv[1:])
    points, rows, dirs, start = _points(a), [], {}, time.perf_counter()
    print(f"{len(points)} points; time limit {a.time_limit:.0f} s", flush=True)
    for i, pt in enumerate(points):
        elapsed = time.perf_counter() - start
        gib, skip = _resolve_budget(pt, rows)
        pt["budget_gib"] = gib
        if skip is None and elapsed > a.time_limit - 15:
            skip = f"time limit ({elapsed:.0f} s of {a.time_limit:.0f})"
        t = time.perf_counter()
        if skip:
            result = dict(status="skipped", message=skip)
        else:
            try:
                if pt["model"] not in dirs:
                    dirs[pt["model"]] = _checkpoint_dir(pt["model"], a.models_dir, a.peer_scripts)
                pt["dir"] = dirs[pt["model"]]
                timeout = max(10.0, min(a.point_timeout, a.time_limit - (time.perf_counter() - start)))
                run = _pronghorn_point if pt["system"] == "pronghorn" else _peer_point
                result = run(pt, a, env, timeout)
            except (OSError, subprocess.CalledProcessError) as e:  # writing the checkpoint dir failed
                result = dict(status="error", message=f"{type(e).__name__}: {e}"[:400])
        rows.append(row := {**{k: v for k, v in pt.items() if k != "dir"}, **result,
                            "elapsed_s": round(time.perf_counter() - t, 1)})
        print(f"[{i + 1}/{len(points)} {time.perf_counter() - start:4.0f} s] {row['system']} {row['workload']} "
              f"budget {row['budget']}{'' if gib is None else f' ({gib:.2f} GiB)'} autocast {row['autocast']} "
              f"{row.get('gc') or ''}: {row['status']} {_fmt(row.get('tok_s'))} tok/s, peak "
              f"{_fmt(row.get('peak_gib'), '.2f')} GiB, est {_fmt(row.get('est_gib'), '.2f')} "
              f"({row['elapsed_s']:.0f} s) {row.get('message', '')[:160]}", flush=True)
        with contextlib.redirect_stdout(io.StringIO()):  # after every point: a killed run keeps what it measured
            write_results(a.json, meta, rows)
    _print_table(rows)
    lines = summary(rows)
    print("\n" + "\n".join(lines))
    png = Path(a.json).with_suffix(".png")
    plot(rows, png)
    write_results(a.json, {**meta, "summary": lines, "elapsed_s": round(time.perf_counter() - start)}, rows)
    print(f"wrote {a.json} and {png} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
