"""Where the GPU waits for the host: the idle stretches of a profiled step and the host ops that ran before them.

Reads a Chrome trace written by ``PROFILE_TRACE=path python benchmarks/train_e2e.py --profile ...`` (gzipped or
not). For each stretch longer than ``--min-us`` with no kernel or copy on the GPU, it prints the kernels before
and after, and the host ops (torch operators, autograd Functions, ``record_function`` ranges) that started
between the two kernels' launches and lasted at least ``--host-us``: what the host was doing while the GPU ran
dry. Usage: ``python benchmarks/trace_gaps.py t-llama-3.2-1b-auto.json.gz [--min-us 100] [--host-us 20]``.
"""

from __future__ import annotations

import argparse
import gzip
import json

_GPU = ("kernel", "gpu_memcpy", "gpu_memset")
_LAUNCH = ("cuda_runtime", "cuda_driver")
_HOST = ("cpu_op", "user_annotation", "python_function")


def load(path: str) -> list[dict]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        return [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]


def gaps(events: list[dict], min_us: float = 100.0, host_us: float = 20.0) -> list[dict]:
    """The GPU's idle stretches over ``min_us``, each with its neighbours and the host ops between their launches."""
    gpu = sorted((e for e in events if e.get("cat") in _GPU), key=lambda e: e["ts"])
    launches = {e.get("args", {}).get("correlation"): e for e in events if e.get("cat") in _LAUNCH}
    host = sorted((e for e in events if e.get("cat") in _HOST), key=lambda e: e["ts"])
    out, end, last = [], None, None
    for k in gpu:
        if end is not None and k["ts"] - end > min_us:
            a = launches.get(last.get("args", {}).get("correlation"))
            b = launches.get(k.get("args", {}).get("correlation"))
            ops = []
            if a and b:
                ops = [(round(h["ts"] - a["ts"]), round(h["dur"]), h["name"]) for h in host
                       if a["ts"] <= h["ts"] <= b["ts"] and h["dur"] >= host_us]
            out.append({"idle_us": round(k["ts"] - end), "before": last["name"], "after": k["name"],
                        "launch_gap_us": round(b["ts"] - a["ts"]) if a and b else None, "host_ops": ops})
        if end is None or k["ts"] + k["dur"] >= end:
            end, last = k["ts"] + k["dur"], k
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trace")
    ap.add_argument("--min-us", type=float, default=100.0, help="idle stretches longer than this (µs)")
    ap.add_argument("--host-us", type=float, default=20.0, help="host ops at least this long (µs)")
    a = ap.parse_args()
    found = gaps(load(a.trace), a.min_us, a.host_us)
    for g in found:
        print(f"idle {g['idle_us']} µs: {g['before'][:60]} -> {g['after'][:60]} "
              f"(launches {g['launch_gap_us']} µs apart)")
        for start, dur, name in g["host_ops"]:
            print(f"    +{start:6d} µs  {dur:6d} µs  {name[:100]}")
    print(f"{len(found)} idle stretches over {a.min_us:g} µs, {sum(g['idle_us'] for g in found)} µs in all")


if __name__ == "__main__":
    main()
