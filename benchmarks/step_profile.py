"""What limits a training step: device time per kernel category, GPU idle time (launch gaps, host waits) and host
synchronizations, from ``torch.profiler`` over a few steps. Used by ``train_e2e.py --profile``.

Categories by kernel name: matmul (cuBLAS/CUTLASS/nvjet GEMMs), attention (flash / memory-efficient SDPA),
nf4 (our dequantization), triton (our other fused kernels: norms, RoPE, SwiGLU, cross-entropy, LoRA),
copy (memcpy/memset: offload traffic), nccl, and elementwise (every other PyTorch kernel). ``idle`` is the
wall time in which no kernel ran. On a CPU (the smoke run) the categories are taken from the CPU operators.
"""

from __future__ import annotations

import re
from typing import Callable

import torch
from torch.profiler import ProfilerActivity, profile

_CATEGORIES = [  # first match wins
    ("nccl", re.compile(r"nccl", re.I)),
    ("copy", re.compile(r"memcpy|memset|copy_", re.I)),
    ("attention", re.compile(r"flash|fmha|attention|sdpa|scaled_dot", re.I)),
    ("nf4", re.compile(r"nf4", re.I)),
    ("matmul", re.compile(r"gemm|cutlass|nvjet|xmma|cublas|matmul|addmm|\bmm\b|aten::mm|aten::bmm|linear", re.I)),
    ("triton", re.compile(r"^_|triton|_kernel$", re.I)),
]
_SYNC = re.compile(r"synchronize|_local_scalar_dense|cudaMemcpy(?!Async)", re.I)


def category(name: str) -> str:
    return next((c for c, pat in _CATEGORIES if pat.search(name)), "elementwise")


def _busy_us(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if e > end:
            total += e - max(s, end)
            end = e
    return total


def _gaps_us(intervals: list[tuple[float, float]]) -> list[float]:
    """The idle stretches between the merged busy intervals."""
    gaps, end = [], None
    for s, e in sorted(intervals):
        if end is not None and s > end:
            gaps.append(s - end)
        end = e if end is None else max(end, e)
    return gaps


def _gap_neighbours(kernels, min_us: float = 100.0, top: int = 6) -> dict[str, int]:
    """For idle stretches over ``min_us``: how often each (kernel before -> kernel after) pair of names, cut to
    40 characters, brackets one (which part of the step leaves the GPU waiting)."""
    spans = sorted((e.time_range.start, e.time_range.end, e.name) for e in kernels)
    counts: dict[str, int] = {}
    end, before = None, None
    for s, e, name in spans:
        if end is not None and s - end > min_us:
            key = f"{before[:40]} -> {name[:40]}"
            counts[key] = counts.get(key, 0) + 1
        if end is None or e >= end:
            end, before = e, name
    return dict(sorted(counts.items(), key=lambda kv: -kv[1])[:top])


def _host_ops(prof, steps: int, top: int = 8) -> dict[str, float]:
    """The operators (and Python-level ranges) with the most self host time, ms per step."""
    rows = sorted(prof.key_averages(), key=lambda r: -r.self_cpu_time_total)[:top]
    return {r.key[:50]: round(r.self_cpu_time_total * 1e-3 / steps, 2) for r in rows}


def _runtime_calls(events) -> dict[str, float]:
    """Host time (us) per CUDA runtime/driver call name (cudaLaunchKernel, cudaStreamSynchronize, cudaMalloc, ...):
    where the host waits or pays per launch."""
    out: dict[str, float] = {}
    for e in events:
        if e.device_type == torch.autograd.DeviceType.CPU and re.match(r"cu(da)?[A-Z]", e.name):
            out[e.name] = out.get(e.name, 0.0) + e.time_range.elapsed_us()
    return out


def _optimizer_scalar_read(e) -> bool:
    """A ``.item()`` under ``Optimizer.step``: torch.optim's for-each AdamW reads each parameter's step counter,
    a CPU tensor (no device sync). Session 14 counted these as 955 "syncs" a Gemma-3-4B LoRA step (2 x 476)."""
    p = e.cpu_parent
    while p is not None:
        if p.name.startswith("Optimizer.step"):
            return e.name == "aten::_local_scalar_dense"
        p = p.cpu_parent
    return False


def _sync_parents(sync_events, steps: int, top: int = 8) -> dict[str, float]:
    """Per step: which operators the host syncs happen under (the sync's name < its parent < grandparent)."""
    counts: dict[str, int] = {}
    for e in sync_events:
        chain, p = [e.name], e.cpu_parent
        while p is not None and len(chain) < 4:
            chain.append(p.name)
            p = p.cpu_parent
        key = " < ".join(n[:40] for n in chain)
        counts[key] = counts.get(key, 0) + 1
    return {k: round(v / steps, 1) for k, v in sorted(counts.items(), key=lambda kv: -kv[1])[:top]}


def sync_sources(step: Callable[[], None], top: int = 8) -> dict[str, int]:
    """One step under ``torch.cuda.set_sync_debug_mode("warn")``: the Python lines whose operators made the host
    wait for the GPU, with their counts (syncs in C++ autograd code show as the step's own line)."""
    import warnings

    if not torch.cuda.is_available():
        return {}
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
            torch.cuda.synchronize()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    counts: dict[str, int] = {}
    for w in caught:
        if "synchroniz" in str(w.message):
            key = f"{'/'.join(w.filename.rsplit('/', 2)[-2:])}:{w.lineno} {str(w.message).splitlines()[0][:60]}"
            counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1])[:top])


def profile_steps(step: Callable[[], None], steps: int = 2, trace: str | None = None) -> dict:
    """Run ``step`` ``steps`` times under the profiler; per-step milliseconds by category, idle, wall, syncs.
    ``trace``: also write the profiler's Chrome trace there, gzipped (host ops and kernels on one timeline:
    what the host was doing while the GPU waited)."""
    cuda = torch.cuda.is_available()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=acts) as prof:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize()
    if trace:
        import gzip
        import os
        import shutil

        prof.export_chrome_trace(trace)
        with open(trace, "rb") as src, gzip.open(trace + ".gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.remove(trace)
    events = prof.events()
    device_type = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    # a record_function range (e.g. "Optimizer.step#AdamW.step") also shows on the GPU timeline, over the kernels
    # it launched: not a kernel (counted as one, it doubled the optimizer's time and hid idle gaps)
    kernels = [e for e in events if e.device_type == device_type and (cuda or e.cpu_parent is None)
               and not (cuda and getattr(e, "is_user_annotation", False))]
    by_cat: dict[str, float] = {}
    for e in kernels:
        c = category(e.name)
        by_cat[c] = by_cat.get(c, 0.0) + e.time_range.elapsed_us()
    starts = [e.time_range.start for e in events]
    ends = [e.time_range.end for e in events]
    wall_us = (max(ends) - min(starts)) if events else 0.0
    busy = _busy_us([(e.time_range.start, e.time_range.end) for e in kernels])
    sync_events = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU and _SYNC.search(e.name)
                   and not _optimizer_scalar_read(e)]
    syncs = len(sync_events)
    per = 1e-3 / steps
    out = {f"{c}_ms": round(v * per, 2) for c, v in sorted(by_cat.items(), key=lambda kv: -kv[1])}
    out.update(idle_ms=round(max(0.0, wall_us - busy) * per, 2), wall_ms=round(wall_us * per, 2),
               host_syncs_per_step=round(syncs / steps, 1))
    out["syncs_under"] = _sync_parents(sync_events, steps)
    if cuda:  # where the idle time is: many short launch gaps or a few long host waits
        gaps = _gaps_us([(e.time_range.start, e.time_range.end) for e in kernels])
        long = [g for g in gaps if g > 100]
        out.update(gaps_per_step=round(len(gaps) / steps), gaps_over_100us_per_step=round(len(long) / steps, 1),
                   gaps_over_100us_ms=round(sum(long) * per, 2))
        calls = sorted(_runtime_calls(events).items(), key=lambda kv: -kv[1])[:6]
        out["host_runtime_ms"] = {name: round(us * per, 2) for name, us in calls}
        out["long_gaps_between"] = _gap_neighbours(kernels)
        out["host_self_ms"] = _host_ops(prof, steps)
        by_name: dict[str, float] = {}
        for e in kernels:
            by_name[e.name[:70]] = by_name.get(e.name[:70], 0.0) + e.time_range.elapsed_us()
        ranked = sorted(by_name.items(), key=lambda kv: -kv[1])
        out["top_kernels_ms"] = {k: round(v * per, 2) for k, v in ranked[:14]}
        # what is not a GEMM, by name: the levers once the matmuls are the same as a peer's
        others = [(k, v) for k, v in ranked if category(k) != "matmul"][:16]
        out["top_non_matmul_ms"] = {k: round(v * per, 2) for k, v in others}
    return out


def limit(p: dict) -> str:
    """The largest share of the step, in words (for the table and docs/benchmarks.md)."""
    parts = {k[:-3]: v for k, v in p.items() if k.endswith("_ms") and isinstance(v, (int, float))
             and k not in ("wall_ms", "gaps_over_100us_ms")}
    if not parts or not p.get("wall_ms"):
        return "-"
    top = max(parts, key=parts.get)
    return f"{top} {100 * parts[top] / p['wall_ms']:.0f}%"
