"""Decode throughput: pronghorn's generate (eager loop, static cache, static cache + CUDA graph) against
transformers' ``generate`` (default dynamic cache; static cache, which transformers compiles on CUDA; static
cache with compilation off), on the same random weights.

Random-init Llama weights (the real architecture config), bf16, random prompts of ``--prompt`` tokens (no
padding), greedy, exactly ``--new`` new tokens (no EOS). Each system runs once untimed (graph capture,
torch.compile, kernel compilation: its time is reported as ``first_s``), then ``--repeats`` timed runs;
tok/s = batch * new tokens / median wall time of one generate call (prefill included).

    python benchmarks/generate.py --batches 1,32 --json generate.json      # H100: Llama-3.2-1B config
    python benchmarks/generate.py --smoke                                  # CPU: tiny config, seconds
    python benchmarks/generate.py --lora 16 --batches 32,64 --prompt 64 \
        --systems pronghorn-graph,pronghorn-graph-nokeep,pronghorn-static   # GRPO's decode: live LoRA adapters

``--lora R`` attaches fp32 adapters of rank R to every projection of pronghorn's model (B random, so the delta is
not zero), as GRPO decodes; the transformers systems are then left out (they would decode without adapters).
``pronghorn-graph-nokeep`` is the graph without the adapters' kept operands (kernels/adapter_operands.py
``GraphOperands``: the graph then casts and scales every adapter each step, as before session 15), an ablation
for measuring what keeping them saves.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from common import run_meta, write_results

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_e2e import TARGETS, WORKLOADS  # noqa: E402  (one source for configs and LoRA targets)

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=256, tie_word_embeddings=True, rope_theta=10000.0, max_position_embeddings=512)
SYSTEMS = ["pronghorn-eager", "pronghorn-static", "pronghorn-graph", "pronghorn-graph-nokeep", "hf-dynamic",
           "hf-static", "hf-static-nocompile"]
GRAPH_ONLY = ("pronghorn-graph", "pronghorn-graph-nokeep")  # CUDA graphs: not in --smoke
BASELINE = "hf-dynamic"


def build_models(cfg: dict, dtype: torch.dtype, device: str):
    """(transformers LlamaForCausalLM, pronghorn model) holding the same random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from pronghorn.causal_lm import PronghornForCausalLM
    from pronghorn.models.config import ModelConfig

    torch.manual_seed(0)
    hf_cfg = LlamaConfig(**cfg, hidden_act="silu", rms_norm_eps=1e-5, attn_implementation="sdpa")
    with torch.device(device):
        hf = LlamaForCausalLM(hf_cfg).to(dtype).eval()
    hf.generation_config.eos_token_id = None  # exactly --new tokens
    hf.generation_config.pad_token_id = 0
    with torch.device("meta"):
        ours = PronghornForCausalLM(ModelConfig.from_hf_dict({**hf_cfg.to_dict(), "model_type": "llama"}), dtype=dtype)
    state = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight" or not cfg["tie_word_embeddings"]}
    ours.load_state_dict(state, strict=False, assign=True)  # shares hf's tensors: no second copy
    ours.tie_weights()
    missing = [n for n, p in ours.named_parameters() if p.is_meta]
    assert not missing, missing
    return hf, ours.eval()


def run_system(system: str, hf, ours, ids: torch.Tensor, new: int) -> torch.Tensor:
    from pronghorn.infer import generate

    mask = torch.ones_like(ids)
    if system == "pronghorn-graph-nokeep":
        return _without_kept_operands(lambda: generate(ours, ids, mask, max_new_tokens=new, eos_token_id=[],
                                                       pad_token_id=0, decode_mode="graph"))
    if system.startswith("pronghorn-"):
        return generate(ours, ids, mask, max_new_tokens=new, eos_token_id=[], pad_token_id=0,
                        decode_mode=system.split("-", 1)[1])
    kw = dict(attention_mask=mask, max_new_tokens=new, do_sample=False)
    if system == "hf-static":
        kw.update(cache_implementation="static")
    elif system == "hf-static-nocompile":
        kw.update(cache_implementation="static", disable_compile=True)
    return hf.generate(ids, **kw)


def _without_kept_operands(call):
    """``call()`` with the decode runner's operand store making every operand anew (the ablation): a graph
    captured inside records the casts and scales, as before the store (``main`` drops the runners between
    systems, so this system captures its own graph in its untimed first call)."""
    from pronghorn.kernels import adapter_operands as ops

    kept = ops._kept_in_place
    ops._kept_in_place = lambda store, key, sources, make: make()
    try:
        return call()
    finally:
        ops._kept_in_place = kept


def add_lora(ours, rank: int) -> None:
    """fp32 adapters of ``rank`` on every projection, B drawn at random (a trained adapter's delta)."""
    from pronghorn.models.lora import LoRAConfig, attach_lora

    attach_lora(ours, LoRAConfig(r=rank, lora_alpha=rank, target_modules=TARGETS))
    g = torch.Generator(device=ours.device).manual_seed(1)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02, generator=g)


def measure(system: str, hf, ours, batch: int, prompt: int, new: int, repeats: int, device: str) -> dict:
    vocab = ours.config.vocab_size
    ids = torch.randint(3, vocab, (batch, prompt), generator=torch.Generator().manual_seed(batch)).to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    row = dict(system=system, batch=batch, prompt=prompt, new=new)
    try:
        sync()
        t = time.perf_counter()
        out = run_system(system, hf, ours, ids, new)
        sync()
        row["first_s"] = round(time.perf_counter() - t, 3)
        times = []
        for _ in range(repeats):
            sync()
            t = time.perf_counter()
            out = run_system(system, hf, ours, ids, new)
            sync()
            times.append(time.perf_counter() - t)
    except Exception as e:  # noqa: BLE001 - a system that cannot run here is reported, not fatal
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        return row
    assert out.shape == (batch, prompt + new), out.shape
    median = statistics.median(times)
    row.update(call_s=round(median, 4), tok_s=round(batch * new / median, 1), tokens=out[:, prompt:].cpu())
    return row


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workload", default="llama-3.2-1b", choices=sorted(WORKLOADS))
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--json", default="generate.json")
    ap.add_argument("--smoke", action="store_true", help="tiny config on the CPU (fp32): checks the script runs")
    ap.add_argument("--lora", type=int, default=0, help="rank of fp32 adapters on every projection (0: none)")
    a = ap.parse_args(argv)
    if a.smoke:
        cfg, dtype, device, workload = TINY, torch.float32, "cpu", "tiny"
        a.prompt, a.new, a.repeats = min(a.prompt, 16), min(a.new, 8), 1
    else:
        if not torch.cuda.is_available():
            raise SystemExit("the benchmark needs a CUDA GPU; use --smoke on a CPU")
        cfg, dtype, device, workload = WORKLOADS[a.workload][0], torch.bfloat16, "cuda", a.workload
    systems = [s for s in a.systems.split(",") if s and not (a.smoke and s in GRAPH_ONLY)]  # CUDA only
    if a.lora:
        left = [s for s in systems if s.startswith("hf-")]
        systems = [s for s in systems if not s.startswith("hf-")]
        if left:
            print(f"--lora {a.lora}: {', '.join(left)} left out (transformers' model has no adapters here)")
    unknown = sorted(set(systems) - set(SYSTEMS))
    if unknown:
        raise SystemExit(f"unknown systems {unknown}; choose among {SYSTEMS}")
    from pronghorn.infer import static_decode

    hf, ours = build_models(cfg, dtype, device)
    if a.lora:
        add_lora(ours, a.lora)
        workload += f"+lora{a.lora}"
    rows = []
    for batch in [int(b) for b in a.batches.split(",")]:
        for system in systems:
            rows.append(measure(system, hf, ours, batch, a.prompt, a.new, a.repeats, device))
            static_decode._RUNNERS.clear()  # each system captures its own graph (its first, untimed call)
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "tokens"}), flush=True)
    _report(rows, workload)
    results = [{k: v for k, v in r.items() if k != "tokens"} for r in rows]
    write_results(a.json, run_meta(workload=workload, dtype=str(dtype)), results)

def _report(rows: list[dict], workload: str) -> None:
    """The table; ``same`` is the share of rows whose new tokens equal pronghorn-eager's (bf16 random
    weights have near-ties, so kernels that round differently may diverge after a while: informational)."""
    print(f"\n{workload}: {'system':<20} {'batch':>5} {'tok/s':>9} {'call s':>8} {'first s':>8} "
          f"{'vs ' + BASELINE:>14} {'same':>5}")
    for r in rows:
        if "error" in r:
            print(f"{'':<{len(workload) + 1}} {r['system']:<20} {r['batch']:>5}   error: {r['error']}")
            continue
        base = next((b for b in rows if b["system"] == BASELINE and b["batch"] == r["batch"] and "tok_s" in b), None)
        ref = next((b for b in rows if b["system"] == "pronghorn-eager" and b["batch"] == r["batch"]
                    and "tokens" in b), None)
        ratio = f"{r['tok_s'] / base['tok_s']:.2f}x" if base else "-"
        same = f"{(r['tokens'] == ref['tokens']).all(-1).float().mean().item():.2f}" if ref else "-"
        r["vs_" + BASELINE] = round(r["tok_s"] / base["tok_s"], 3) if base else None
        r["same_as_eager"] = float(same) if ref else None
        print(f"{'':<{len(workload) + 1}} {r['system']:<20} {r['batch']:>5} {r['tok_s']:>9} {r['call_s']:>8} "
              f"{r['first_s']:>8} {ratio:>14} {same:>5}")


if __name__ == "__main__":
    main()
