"""What the memory plan picks, and its estimated peak, for the benchmark workloads under given budgets: no GPU needed.

The model is built on the meta device (no memory, no weights), so this runs anywhere in seconds; the resident
bytes are the weights' (bf16; QLoRA's projections at NF4's stored size, pronghorn/models/plan_preview.py)
plus the LoRA adapters, as ``torch.cuda.memory_allocated`` would count them at the first step. It shows what
``get_peft_model(..., max_memory=...)`` would do on a GPU of that size, e.g. at Unsloth's measured peaks:

    python benchmarks/plan_preview.py --budgets 3.65,8,16.68,24 --json plans.json

Compare its estimates with measured peaks: benchmarks/memory_budget.py records both.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import run_meta, write_results  # noqa: E402
from train_e2e import TARGETS, WORKLOADS  # noqa: E402

GIB = 2**30
CASES = {  # name: (workload, batch, seq, qlora)
    "1b-lora": ("llama-3.2-1b", 4, 2048, False),
    "8b-lora": ("llama-3.1-8b", 2, 2048, False),
    "8b-qlora": ("llama-3.1-8b", 2, 2048, True),
    "8b-qlora-1x8192": ("llama-3.1-8b", 1, 8192, True),
    "8b-lora-2x4096": ("llama-3.1-8b", 2, 4096, False),
    "1b-lora-8x4096": ("llama-3.2-1b", 8, 4096, False),
}


def preview(case: str, budget_gib: float | None, mode: str = "auto", replay: str = "auto",
            graphs: bool = False) -> dict:
    from pronghorn.models.config import ModelConfig
    from pronghorn.models.lora import LoRAConfig
    from pronghorn.models.memory_plan import relative_cost
    from pronghorn.models.plan_preview import meta_step_sizes, plan_for_sizes

    workload, batch, seq, qlora = CASES[case]
    cfg = ModelConfig.from_hf_dict({"model_type": "llama", "hidden_act": "silu", "rms_norm_eps": 1e-5,
                                    **WORKLOADS[workload][0]})
    s = meta_step_sizes(cfg, batch, seq, LoRAConfig(r=16, lora_alpha=16, target_modules=TARGETS), load_in_4bit=qlora)
    row = dict(case=case, batch=batch, seq=seq, budget_gib=budget_gib, mode=mode,
               resident_gib=round(s.resident / GIB, 3))
    try:
        plan = plan_for_sizes(s, batch, seq, None if budget_gib is None else int(budget_gib * GIB), "--budgets",
                              mode=mode, replay=replay, graphs=graphs)
        # the cost model's step in layer-steps (keeping every layer: one per layer), for comparing plans
        step = len(plan.layers) + relative_cost(plan, s.tokens)
        row.update(ok=True, estimate_gib=round(plan.estimate_bytes / GIB, 3), plan=plan.summary(),
                   layers={m: plan.layers.count(m) for m in ("keep", "recompute", "offload")},
                   model_step=round(step, 2))
    except Exception as e:  # the planner's "does not fit" error, with the smallest budget that would
        row.update(ok=False, error=str(e))
    return row


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated: {', '.join(CASES)}")
    ap.add_argument("--budgets", default="none,3.65,8,16,16.68,24,48", help="GiB, comma-separated; none: unlimited")
    ap.add_argument("--modes", default="auto", help="auto | on | offload | off, comma-separated")
    ap.add_argument("--replay", default="auto", choices=("auto", "whole", "split"), help="a replayed layer's replay")
    ap.add_argument("--graphs", action="store_true", help="plans may replay and keep layers as CUDA graphs (as on a "
                    "GPU)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    rows = []
    for case in a.cases.split(","):
        for budget in a.budgets.split(","):
            for mode in a.modes.split(","):
                gib = None if budget == "none" else float(budget)
                row = preview(case, gib, mode, a.replay, a.graphs)
                rows.append(row)
                what = (f"est {row['estimate_gib']:6.2f} GiB  step {row['model_step']:5.2f}  {row['plan']}"
                        if row["ok"] else row["error"][:160])
                print(f"{case:16s} {budget:>6s} GiB {mode:8s} {what}", flush=True)
    if a.json:
        write_results(a.json, run_meta(device="meta (no GPU)"), rows)


if __name__ == "__main__":
    main()
