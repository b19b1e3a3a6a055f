"""What the memory plan picks, and its estimated peak, for the benchmark workloads under given budgets: no GPU needed.

The model is built on the meta device (no memory, no weights), so this runs anywhere in seconds; the resident
bytes are the weights' (bf16; QLoRA's projections at NF4's 4.5 bits per weight with double-quantized statistics)
plus the LoRA adapters, as ``torch.cuda.memory_allocated`` would count them at the first step. It shows what
``get_peft_model(..., max_memory=...)`` would do on a GPU of that size, e.g. at Unsloth's measured peaks:

    python benchmarks/plan_preview.py --budgets 3.65,8,16.68,24 --json plans.json

Compare its estimates with measured peaks: benchmarks/memory_budget.py records both.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import run_meta, write_results  # noqa: E402
from train_e2e import TARGETS, WORKLOADS  # noqa: E402

GIB = 2**30
NF4_BYTES_PER_WEIGHT = 4.5 / 8  # 4-bit codes + fp8 absmax per 64 + fp32 statistics per 256 blocks (bnb's layout)
CASES = {  # name: (workload, batch, seq, qlora)
    "1b-lora": ("llama-3.2-1b", 4, 2048, False),
    "8b-lora": ("llama-3.1-8b", 2, 2048, False),
    "8b-qlora": ("llama-3.1-8b", 2, 2048, True),
    "8b-qlora-1x8192": ("llama-3.1-8b", 1, 8192, True),
    "8b-lora-2x4096": ("llama-3.1-8b", 2, 4096, False),
    "1b-lora-8x4096": ("llama-3.2-1b", 8, 4096, False),
}


def preview(case: str, budget_gib: float | None, mode: str = "auto", replay: str = "auto", graphs: bool = False) -> dict:
    from pronghorn.models.config import ModelConfig
    from pronghorn.models.decoder import DecoderForCausalLM
    from pronghorn.models.linear import Linear
    from pronghorn.models.lora import LoRAConfig, attach_lora
    from pronghorn.models.memory_plan import make_plan, step_sizes

    workload, batch, seq, qlora = CASES[case]
    cfg = ModelConfig.from_hf_dict({"model_type": "llama", "hidden_act": "silu", "rms_norm_eps": 1e-5,
                                    **WORKLOADS[workload][0]})
    with torch.device("meta"):
        model = DecoderForCausalLM(cfg, dtype=torch.bfloat16)
    model.tie_weights()
    attach_lora(model, LoRAConfig(r=16, lora_alpha=16, target_modules=TARGETS))
    meta = torch.device("meta")
    s = step_sizes(model.model, batch, seq, torch.bfloat16, meta, model.lm_head)
    if qlora:  # the projections' bases as NF4, dense again only inside a layer's replay
        proj = sum(m.weight.numel() for m in model.modules() if isinstance(m, Linear))
        dense_layer = sum(m.weight.numel() * 2 for m in model.model.layers[0].modules() if isinstance(m, Linear))
        s = replace(s, resident=int(s.resident - proj * (2 - NF4_BYTES_PER_WEIGHT)), dense_layer=dense_layer,
                    backward_extra=s.backward_extra + cfg.intermediate_size * cfg.hidden_size * 2)
    # on a GPU the table could move to the host: the meta device can't say, so offer it as on CUDA
    table = model.model.embed_tokens.weight
    table_bytes = table.numel() * 2
    tied = model.lm_head.weight is table
    s = replace(s, untied_table=0 if tied else table_bytes, tied_table=table_bytes if tied else 0)
    row = dict(case=case, batch=batch, seq=seq, budget_gib=budget_gib, mode=mode,
               resident_gib=round(s.resident / GIB, 3))
    try:
        plan = make_plan(s, None if budget_gib is None else int(budget_gib * GIB), "--budgets", (batch, seq),
                         mode=mode, tiled_mlp="auto", mlp_chunk=8192, replay=replay, graphs=graphs)
        row.update(ok=True, estimate_gib=round(plan.estimate_bytes / GIB, 3), plan=plan.summary(),
                   layers={m: plan.layers.count(m) for m in ("keep", "recompute", "offload")})
    except Exception as e:  # the planner's "does not fit" error, with the smallest budget that would
        row.update(ok=False, error=str(e))
    return row


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated: {', '.join(CASES)}")
    ap.add_argument("--budgets", default="none,3.65,8,16,16.68,24,48", help="GiB, comma-separated; none: unlimited")
    ap.add_argument("--modes", default="auto", help="auto | on | offload | off, comma-separated")
    ap.add_argument("--replay", default="auto", choices=("auto", "whole", "split"), help="a replayed layer's replay")
    ap.add_argument("--graphs", action="store_true", help="plans may replay as CUDA graphs (as on a GPU)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    rows = []
    for case in a.cases.split(","):
        for budget in a.budgets.split(","):
            for mode in a.modes.split(","):
                gib = None if budget == "none" else float(budget)
                row = preview(case, gib, mode, a.replay, a.graphs)
                rows.append(row)
                what = f"est {row['estimate_gib']:6.2f} GiB  {row['plan']}" if row["ok"] else row["error"][:160]
                print(f"{case:16s} {budget:>6s} GiB {mode:8s} {what}", flush=True)
    if a.json:
        write_results(a.json, run_meta(device="meta (no GPU)"), rows)


if __name__ == "__main__":
    main()
