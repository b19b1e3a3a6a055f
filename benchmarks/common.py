"""What every benchmark script shares: the median time of a call, and the run's metadata + JSON results file."""

from __future__ import annotations

import importlib
import json
import platform
import time
from pathlib import Path

import torch

PACKAGES = ("transformers", "triton", "peft", "trl", "liger_kernel", "bitsandbytes")


def median_ms(fn, iters: int, warmup: int = 3) -> float:
    """Median milliseconds of ``fn()``: CUDA events after ``warmup`` calls on a GPU; wall time on a CPU (smoke
    runs: one warm-up call)."""
    if not torch.cuda.is_available():
        fn()
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return sorted(times)[len(times) // 2]
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def run_meta(**extra) -> dict:
    """The device, date, Python and the versions of torch and of whichever of :data:`PACKAGES` are installed,
    then ``extra``."""
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    meta = dict(device=device, torch=torch.__version__, python=platform.python_version(), date=time.strftime("%Y-%m-%d"))
    for name in PACKAGES:
        try:
            meta[name] = importlib.import_module(name).__version__
        except Exception:  # not installed, or broken on this machine: leave it out
            pass
    return {**meta, **extra}


def peak_bytes(model) -> int:
    """The CUDA peak of a run: ``max_memory_allocated`` plus what pronghorn's replay and kept-layer graphs hold in
    their memory pools beyond live tensors (models/replay_graphs.py, models/kept_graphs.py: reserved for the whole
    step, unseen by the allocated count between replays)."""
    decoder = getattr(model, "model", None)
    pools = [getattr(decoder, name, None) for name in ("graphs", "kept_graphs")]
    return torch.cuda.max_memory_allocated() + sum(g.pool_bytes() for g in pools if g is not None)


def write_results(path: str | Path, meta: dict, rows: list[dict]) -> None:
    """``{"meta": ..., "results": ...}`` written atomically to ``path``; the metadata printed as one JSON line."""
    from pronghorn.files import atomic_file

    with atomic_file(Path(path), "w") as f:
        json.dump({"meta": meta, "results": rows}, f, indent=2)
    print(json.dumps(meta))


def step_timer(device: str, times: list[float]):
    """A transformers ``TrainerCallback`` that appends each optimizer step's wall time to ``times`` (the device
    synchronized at both ends) and resets the CUDA peak when training begins."""
    from transformers import TrainerCallback

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    class StepTimer(TrainerCallback):
        def on_train_begin(self, *a, **k):
            sync()
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()

        def on_step_begin(self, *a, **k):
            sync()
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            sync()
            times.append(time.perf_counter() - self.t)

    return StepTimer()
