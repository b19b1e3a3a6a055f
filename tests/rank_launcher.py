"""Start a test file as the worker of each rank of a 2+ process gloo job on the CPU (the variables torchrun
sets, without torchrun's agent, so that the survivors of a failed rank must notice on their own)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env(**extra) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}",
           "CUDA_VISIBLE_DEVICES": "", **extra}  # CPU processes and gloo, also on a machine with GPUs
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None) if k not in extra else None
    return env


def spawn(script: str, args: list[str], world: int = 2) -> list[subprocess.Popen]:
    """``python script *args`` once per rank."""
    port = str(free_port())
    return [subprocess.Popen(
        [sys.executable, script, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=worker_env(RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=port))
        for r in range(world)]


def wait(procs: list[subprocess.Popen], timeout: float) -> list[tuple[int, str]]:
    """(return code, stdout + stderr) of each; any still running at the end is killed."""
    results = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=timeout)
            results.append((p.returncode, stdout + stderr))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return results


def run_workers(script: str, out: Path, timeout: float = 600, world: int = 2) -> Path:
    """Spawn ``script out`` as every rank's worker and wait (fails with a rank's log tail when one did not exit
    0); returns ``out``, where the workers saved their results (:func:`save_rank_results`)."""
    for rc, log in wait(spawn(script, [str(out)], world), timeout=timeout):
        assert rc == 0, log[-3000:]
    return out


def save_rank_results(out: Path, runs: dict) -> int:
    """A rank's worker: join the job, then save each ``runs[name]()`` as ``out/<name>-rank<r>.pt``."""
    from pronghorn.train.distributed import init_distributed

    env = init_distributed(120.0)
    for name, run in runs.items():
        torch.save(run(), Path(out) / f"{name}-rank{env.rank}.pt")
    return 0


def rank_results(out: Path, name: str, world: int = 2) -> list:
    return [torch.load(Path(out) / f"{name}-rank{r}.pt") for r in range(world)]


def close(a: torch.Tensor, b: torch.Tensor, rel: float) -> bool:
    """fp32 summation order differs between the runs: tolerance relative to the tensor's largest entry."""
    return bool((a - b).abs().max() <= rel * max(b.abs().max(), 1e-30))
