"""Longest single sequence that trains (forward + backward + optimizer step): Llama-3.1-8B config, QLoRA NF4,
LoRA r=16 on every projection, batch 1, checkpointing ``offload`` (layer inputs in pinned host memory).

    python benchmarks/long_context.py --lengths 65536,131072,262144,393216 --json long_context.json

Tries each length in order on one model and stops at the first that runs out of GPU (or host) memory;
prints one JSON line per length (step seconds, peak GiB) and writes them all to --json.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from train_e2e import WORKLOADS, _pronghorn_qlora_model


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="65536,131072,262144,393216")
    ap.add_argument("--gc", default="offload")
    ap.add_argument("--json", default="long_context.json")
    ap.add_argument("--smoke", action="store_true", help="tiny config on the CPU")
    a = ap.parse_args(argv)
    cuda = torch.cuda.is_available() and not a.smoke
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    cfg = dict(WORKLOADS["tiny" if a.smoke else "llama-3.1-8b"][0])
    lengths = [64, 128] if a.smoke else [int(n) for n in a.lengths.split(",")]
    cfg["max_position_embeddings"] = max(cfg["max_position_embeddings"], max(lengths))
    torch.manual_seed(0)
    model = _pronghorn_qlora_model(cfg, device, dtype, a.gc).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    rows = []
    for n in lengths:
        ids = torch.randint(0, cfg["vocab_size"], (1, n), device=device)
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        try:
            with torch.autocast(device, dtype=dtype, enabled=cuda):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
        except (torch.OutOfMemoryError, RuntimeError) as e:
            rows.append(dict(tokens=n, ok=False, error=str(e).splitlines()[0][:160]))
            print(json.dumps(rows[-1]), flush=True)
            break
        rows.append(dict(tokens=n, ok=True, step_s=round(time.perf_counter() - t, 2), loss=round(float(loss.detach()), 4),
                         peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None))
        print(json.dumps(rows[-1]), flush=True)
        del loss
    meta = dict(device=torch.cuda.get_device_name() if cuda else "cpu", torch=torch.__version__, gc=a.gc)
    with open(a.json, "w") as f:
        json.dump(dict(meta=meta, results=rows), f, indent=1)
    best = max((r["tokens"] for r in rows if r["ok"]), default=0)
    print(f"longest sequence trained: {best:,} tokens ({meta['device']}, QLoRA 8B config, gc={a.gc})")


if __name__ == "__main__":
    main()
