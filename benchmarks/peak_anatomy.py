"""What is allocated at the peak of a pronghorn training step, beside what the memory plan estimated (issue 15:
the estimate within 10% of the measured peak).

One LoRA step of a benchmark workload under a budget (random weights, the same model, adapters and memory plan as
``get_peft_model(..., max_memory=...)``; AdamW; two warm-up steps first, so the optimizer state exists). The third
step runs under ``torch.cuda.memory._record_memory_history``; the allocation trace is replayed to find the peak,
and the blocks alive there are grouped by the pronghorn (or torch) source line that allocated them. The estimate is
shown by its parts (``estimate_parts``). CUDA only:

    python benchmarks/peak_anatomy.py --workload llama-3.2-1b --batch 8 --seq 4096 --budget 8 --json out.json
    python benchmarks/peak_anatomy.py --workload gemma-3-4b --batch 2 --seq 2048 --budget 0 --gc on   # no budget
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import run_meta, write_results  # noqa: E402
from family_configs import FAMILY_CONFIGS  # noqa: E402
from train_e2e import TARGETS, WORKLOADS  # noqa: E402

GIB = 2**30


def _origin(frames: list[dict]) -> str:
    """The innermost pronghorn frame of an allocation (else the innermost Python frame), as file:line function."""
    python = [f for f in frames if f.get("filename", "").endswith(".py")]
    ours = [f for f in python if "/pronghorn/" in f["filename"]]
    f = (ours or python or [{"filename": "?", "line": 0, "name": "?"}])[0]
    return f"{'/'.join(Path(f['filename']).parts[-2:])}:{f['line']} {f['name']}"


def live_at_peak(trace: list[dict], baseline: int) -> tuple[int, dict[str, int], int]:
    """(peak bytes, bytes alive at the peak per origin, allocations alive then) from a device trace that starts
    with ``baseline`` bytes allocated (blocks from before the trace count as one origin, ``before``)."""
    live: dict[int, tuple[int, str]] = {}
    current = peak = baseline
    at_peak: dict[int, tuple[int, str]] = {}
    for ev in trace:
        action, addr, size = ev["action"], ev["addr"], ev["size"]
        if action == "alloc":
            live[addr] = (size, _origin(ev.get("frames", [])))
            current += size
            if current > peak:
                peak, at_peak = current, dict(live)
        elif action == "free_requested" and addr in live:
            current -= live.pop(addr)[0]
    groups: dict[str, int] = defaultdict(int)
    groups["before the step (weights, adapters, optimizer state, ...)"] = baseline
    for size, origin in at_peak.values():
        groups[origin] += size
    return peak, dict(sorted(groups.items(), key=lambda kv: -kv[1])), len(at_peak)


def estimate_parts(sizes, plan) -> dict:
    """:func:`pronghorn.models.memory_plan.estimate_peak` by its parts, in GiB: resident bytes, optimizer bytes to
    come, the loss moment and the largest layer-backward moment (with the layer it is at)."""
    from pronghorn.models.memory_plan import estimate_peak, step_moments

    moments = step_moments(sizes, plan)
    top = max(range(1, len(moments)), key=moments.__getitem__)
    gib = lambda v: round(v / GIB, 3)  # noqa: E731
    return dict(resident=gib(sizes.resident), to_come=gib(sizes.to_come), loss_moment=gib(moments[0]),
                backward_moment=gib(moments[top]), backward_layer=top - 1, total=gib(estimate_peak(sizes, plan)))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", default="llama-3.2-1b", choices=sorted(WORKLOADS) + sorted(FAMILY_CONFIGS))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--budget", type=float, default=8.0, help="GiB: max_memory and the process's memory fraction "
                    "(0: none, with --gc picking the layers)")
    ap.add_argument("--gc", default="auto", choices=["auto", "on", "off", "offload"],
                    help="gradient_checkpointing mode (auto: the plan under --budget)")
    ap.add_argument("--top", type=int, default=25, help="origins to print")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("peak_anatomy.py needs a CUDA GPU")
    from pronghorn.models.builder import init_random_model
    from pronghorn.models.config import ModelConfig
    from pronghorn.models.lora import LoRAConfig, attach_lora
    from pronghorn.models.memory_plan import step_sizes

    if a.budget:
        torch.cuda.set_per_process_memory_fraction(a.budget * GIB / torch.cuda.get_device_properties(0).total_memory)
    family = FAMILY_CONFIGS.get(a.workload)  # a family's config names its model_type (Gemma 3, Phi-3.5, ...)
    cfg = ModelConfig.from_hf_dict(dict(family) if family else
                                   {"model_type": "llama", "hidden_act": "silu", "rms_norm_eps": 1e-5,
                                    **WORKLOADS[a.workload][0]})
    model = init_random_model(cfg, torch.bfloat16, "cuda")
    attach_lora(model, LoRAConfig(r=16, lora_alpha=16, target_modules=TARGETS), seed=3407)
    model.gradient_checkpointing_enable(mode=a.gc, max_memory=int(a.budget * GIB) if a.budget else None)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, cfg.vocab_size, (a.batch, a.seq), device="cuda")

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    step()
    plan = model.model.memory_plan
    # the sizes the plan was made from (first step: optimizer state to come), as the planner saw them
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated()
    torch.cuda.memory._record_memory_history(max_entries=2_000_000)
    step()
    torch.cuda.synchronize()
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    measured = torch.cuda.max_memory_allocated()
    peak, groups, count = live_at_peak(snap["device_traces"][0], baseline)
    sizes_now = step_sizes(model.model, a.batch, a.seq, torch.bfloat16, torch.device("cuda"), model.lm_head,
                           first_step=False, optimizer=model.model.optimizer_footprint)
    est = dict(plan=plan.summary(), estimate_gib=round(plan.estimate_bytes / GIB, 3),
               parts_now=estimate_parts(sizes_now, plan))
    print(f"plan: {est['plan']}")
    print(f"estimate {est['estimate_gib']} GiB; its parts now (optimizer state allocated): {est['parts_now']}")
    print(f"measured peak {measured / GIB:.3f} GiB (trace replay {peak / GIB:.3f} GiB, {count} blocks alive); "
          f"estimate / peak {plan.estimate_bytes / measured:.3f}")
    print("alive at the peak, by origin:")
    for origin, size in list(groups.items())[:a.top]:
        print(f"  {size / GIB:8.3f} GiB  {origin}")
    if a.json:
        write_results(a.json, run_meta(device=torch.cuda.get_device_name()),
                      [dict(vars(a), measured_gib=round(measured / GIB, 3), trace_peak_gib=round(peak / GIB, 3),
                            groups_gib={k: round(v / GIB, 4) for k, v in groups.items()}, **est)])


if __name__ == "__main__":
    main()
