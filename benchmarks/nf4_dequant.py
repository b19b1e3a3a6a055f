"""NF4 dequantization bandwidth: pronghorn's Triton kernel vs the PyTorch reference vs bitsandbytes (if present),
at the Llama-3.1-8B projection shapes, each checked equal to the reference first.

    python benchmarks/nf4_dequant.py --json nf4_dequant.json          # CUDA
    python benchmarks/nf4_dequant.py --smoke                          # tiny, CPU (Triton interpreter)
    python benchmarks/nf4_dequant.py --sweep                          # + every tile (values/program, warps)

GB/s counts the packed bytes + 8-bit absmax read once and the 16-bit output written once.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from common import median_ms, run_meta, write_results

SHAPES = {"q_proj 4096x4096": (4096, 4096), "k_proj 1024x4096": (1024, 4096),
          "gate_proj 14336x4096": (14336, 4096), "down_proj 4096x14336": (4096, 14336)}

TILES = [(v, w) for v in (1024, 2048, 4096, 8192, 16384) for w in (2, 4, 8)]


def _bnb(w):
    try:
        import bitsandbytes.functional as F
    except ImportError:
        return None
    tensors = w.bnb_tensors()
    qs = F.QuantState.from_dict({k: v for k, v in tensors.items() if k}, device=w.device)
    return lambda dtype=w.dtype: F.dequantize_4bit(tensors[""], qs).to(dtype)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, runs on the CPU under the interpreter")
    ap.add_argument("--sweep", action="store_true", help="also time the kernel at other tiles (values, warps)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from pronghorn.kernels.nf4 import dequantize_nf4_reference, quantize_nf4
    from pronghorn.kernels.nf4_triton import dequantize_nf4_triton

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if a.smoke:  # the CPU interpreter truncates fp32 -> bf16 (GPUs round to nearest): compare in fp32
        a.dtype = "float32"
    dtype = getattr(torch, a.dtype)
    shapes = {"smoke 96x200": (96, 200)} if a.smoke else SHAPES
    rows = []
    for name, shape in shapes.items():
        w = quantize_nf4(torch.randn(shape, device=dev, dtype=dtype) * 0.02)
        ref = dequantize_nf4_reference(w, dtype)
        impls = {"pronghorn-triton": lambda d=dtype, w=w: dequantize_nf4_triton(w, d),
                 "torch-reference": lambda d=dtype, w=w: dequantize_nf4_reference(w, d)}
        for vpp, warps in (TILES if a.sweep else ()):
            impls[f"triton {vpp}v/{warps}w"] = (lambda d=dtype, w=w, v=vpp, nw=warps:
                                                dequantize_nf4_triton(w, d, values_per_program=v, num_warps=nw))
        bnb = _bnb(w)
        if bnb is not None:
            impls["bitsandbytes"] = bnb
        nbytes = w.packed.numel() + w.absmax.numel() + w.numel() * torch.finfo(dtype).bits // 8
        for impl, fn in impls.items():
            equal = torch.equal(fn(dtype), ref)
            ms = median_ms(fn, a.iters if dev == "cuda" else 1)
            rows.append(dict(shape=name, impl=impl, dtype=a.dtype, ms=round(ms, 4),
                             gb_s=round(nbytes / (ms * 1e-3) / 1e9, 1), equal_to_reference=equal))
            print(json.dumps(rows[-1]), flush=True)
    print(f"\n{'shape':<24}{'impl':<22}{'ms':>9}{'GB/s':>9}  equal")
    for r in rows:
        print(f"{r['shape']:<24}{r['impl']:<22}{r['ms']:>9}{r['gb_s']:>9}  {r['equal_to_reference']}")
    if a.json:
        write_results(a.json, run_meta(), rows)

if __name__ == "__main__":
    main()
