"""Longest single sequence that trains (forward + backward + optimizer step): Llama-3.1-8B config, QLoRA NF4,
LoRA r=16 on every projection, batch 1, checkpointing ``offload`` (layer inputs in pinned host memory) and the
MLP tiled over the sequence (``--tiled-mlp on``, chunks of ``--tiled-mlp-chunk`` tokens: models/tiled_mlp.py).

    python benchmarks/long_context.py --lengths 360448 --json long_context.json
    python benchmarks/long_context.py --smoke          # tiny config on the CPU, tiled MLP on

Tries each length in order on one model and stops at the first that runs out of GPU (or host) memory;
prints one JSON line per length (step seconds, peak GiB, pinned host GiB) and rewrites --json after each.

Host memory: offloading keeps every layer's input in pinned host memory (layers x tokens x hidden x 2 bytes:
8 KiB per token per layer for the 8B config, 88 GiB for 32 layers at 360,448 tokens). PyTorch's pinned
allocator would round each block up to a power of two (a 2.1 GiB input takes 4 GiB, so a 128 GiB host runs
out past 262,144 tokens); blocks above 256 MiB therefore come from pronghorn's exact-size pool
(models/pinned_host.py). A length whose inputs would not fit in the host's available memory is not tried.

Time: attention is quadratic; on an H100, 65,536 / 131,072 / 196,608 tokens took 28 / 59 / 121 s per step
(untiled) and 360,448 took 382 s (tiled), so 393,216 needs ~7.5 min: one length per call under a 10-minute limit.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ALLOC_CONF = "expandable_segments:True"


def _set_alloc_conf(argv) -> str | None:
    """PYTORCH_ALLOC_CONF from --alloc-conf, before torch is imported (the allocators read it once)."""
    conf = ALLOC_CONF
    if "--alloc-conf" in argv:
        conf = argv[argv.index("--alloc-conf") + 1]
    if conf and not (os.environ.get("PYTORCH_ALLOC_CONF") or os.environ.get("PYTORCH_CUDA_ALLOC_CONF")):
        os.environ["PYTORCH_ALLOC_CONF"] = conf
    return os.environ.get("PYTORCH_ALLOC_CONF") or os.environ.get("PYTORCH_CUDA_ALLOC_CONF")


def _pinned_bytes(size: int, exact_above: int) -> int:
    """What offloading takes in pinned host memory for a block of ``size`` bytes: exact above the pool's
    threshold (models/pinned_host.py), else PyTorch's pinned allocator's power-of-two block."""
    return size if size > exact_above else 1 << max(0, (size - 1).bit_length())


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    conf = _set_alloc_conf(argv)
    import torch

    from pronghorn.files import atomic_file
    from pronghorn.models import memory_plan, pinned_host
    from train_e2e import WORKLOADS, _pronghorn_qlora_model

    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="360448", help="comma-separated, tried in order")
    ap.add_argument("--gc", default="offload")
    ap.add_argument("--tiled-mlp", default="on", help="on | off | auto (models/tiled_mlp.py)")
    ap.add_argument("--tiled-mlp-chunk", type=int, default=None, help="tokens per chunk (default 8192; --smoke 48)")
    ap.add_argument("--alloc-conf", default=ALLOC_CONF, help="PYTORCH_ALLOC_CONF unless already set ('' for none)")
    ap.add_argument("--json", default="long_context.json")
    ap.add_argument("--smoke", action="store_true", help="tiny config on the CPU")
    a = ap.parse_args(argv)
    cuda = torch.cuda.is_available() and not a.smoke
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    cfg = dict(WORKLOADS["tiny" if a.smoke else "llama-3.1-8b"][0])
    lengths = [64, 128] if a.smoke else [int(n) for n in a.lengths.split(",")]
    chunk = a.tiled_mlp_chunk or (48 if a.smoke else 8192)
    cfg["max_position_embeddings"] = max(cfg["max_position_embeddings"], max(lengths))
    torch.manual_seed(0)
    model = _pronghorn_qlora_model(cfg, device, dtype, a.gc).train()
    model.gradient_checkpointing_enable(mode=a.gc, tiled_mlp=a.tiled_mlp, tiled_mlp_chunk=chunk)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    meta = dict(device=torch.cuda.get_device_name() if cuda else "cpu", torch=torch.__version__, gc=a.gc,
                tiled_mlp=model.model.tiled_mlp, tiled_mlp_chunk=chunk, alloc_conf=conf if cuda else None)
    rows, act_bytes = [], torch.empty((), dtype=dtype).element_size()
    for n in lengths:
        ids = torch.randint(0, cfg["vocab_size"], (1, n), device=device)
        if cuda:
            torch.cuda.empty_cache()
            getattr(torch.accelerator, "empty_host_cache", lambda: None)()  # (torch >= 2.12) the last length's pinned blocks
            pinned_host.release_pooled()
            torch.cuda.reset_peak_memory_stats()
        host_need = _host_need(model, n, act_bytes) if cuda else 0
        host_free = memory_plan.free_memory(torch.device("cpu"))  # MemAvailable
        if cuda and host_free is not None and host_need > 0.9 * host_free:
            rows.append(dict(tokens=n, ok=False, error=f"host memory: offloaded layer inputs need "
                             f"{host_need / 2**30:.1f} GiB pinned, {host_free / 2**30:.1f} GiB available"))
            print(json.dumps(rows[-1]), flush=True)
            break
        t = time.perf_counter()
        try:
            with torch.autocast(device, dtype=dtype, enabled=cuda):
                loss = model(input_ids=ids, labels=ids).loss
            if cuda:  # progress, in case the step outlives the caller's time limit
                torch.cuda.synchronize()
                print(f"{n} tokens: forward {time.perf_counter() - t:.1f} s, peak so far "
                      f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB", flush=True)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
        except (torch.OutOfMemoryError, RuntimeError) as e:
            rows.append(dict(tokens=n, ok=False, error=str(e).splitlines()[0][:160]))
            print(json.dumps(rows[-1]), flush=True)
            break
        rows.append(dict(tokens=n, ok=True, step_s=round(time.perf_counter() - t, 2),
                         loss=round(float(loss.detach()), 4),
                         peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
                         reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 2) if cuda else None,
                         host_pinned_gib=round(host_need / 2**30, 1) if cuda else None))
        print(json.dumps(rows[-1]), flush=True)
        _write(a.json, meta, rows, atomic_file)  # after every length: a host OOM kill keeps the rows so far
        del loss
    _write(a.json, meta, rows, atomic_file)
    best = max((r["tokens"] for r in rows if r["ok"]), default=0)
    print(f"longest sequence trained: {best:,} tokens ({meta['device']}, QLoRA 8B config, gc={a.gc}, "
          f"tiled MLP {meta['tiled_mlp']} in chunks of {chunk})")


def _host_need(model, tokens: int, act_bytes: int) -> int:
    """Pinned host bytes the offloaded layer inputs of one step take (for ``--gc auto``: the auto plan's
    offloaded layers, planned with the GPU's free memory now)."""
    from pronghorn.models import recompute

    inner, mode = model.model, recompute.checkpoint_mode(model.model.gradient_checkpointing)
    if mode == "offload":
        layers = len(inner.layers)
    elif mode == "auto":
        plan = inner.plan_step(1, tokens, inner.norm.weight.dtype, inner.norm.weight.device, model.lm_head)
        layers = plan.layers.count("offload")
    else:
        return 0
    from pronghorn.models.pinned_host import EXACT_ABOVE

    return layers * _pinned_bytes(tokens * inner.cfg.hidden_size * act_bytes, EXACT_ABOVE)


def _write(path: str, meta: dict, rows: list, atomic_file) -> None:
    with atomic_file(Path(path), "w") as f:
        json.dump(dict(meta=meta, results=rows), f, indent=1)


if __name__ == "__main__":
    main()
