"""How many device kernels a LoRA training step launches per decoder layer, counted on the CPU.

A small model at a GPU is launch-bound (the session 9 profile of 1B LoRA under a 3.66 GiB budget: 72 of 204 ms
idle between small kernels), so the number of launches per layer is what a fusion must lower. This counts them
without a GPU: the fast (CUDA) dispatch is forced, the Triton kernels run in the interpreter and are counted at
launch, and every PyTorch op that would be a kernel on a GPU is counted by a dispatch mode (views, allocations
and metadata are not kernels; host syncs are counted apart). The per-layer numbers are the difference between a
3-layer and a 1-layer model, halved, so the embedding, the final norm and the loss drop out.

    TRITON_INTERPRET=1 python benchmarks/launch_census.py [--modes off,on:whole,on:split] [--no-autocast]
        [--host-time] [--json out.json]

Prints, per mode (off: nothing recomputed; on: every layer replayed, split as the plan picks), the kernels of a
layer's forward and backward, by op, and writes them as JSON.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import importlib
import json
import os
import sys
import time

os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes  # noqa: E402

_NOT_KERNELS = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "alias",
                "lift_fresh", "set_", "resize_", "is_same_size", "_has_compatible_shallow_copy_type", "result_type",
                "_to_copy_noop", "record_stream", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset",
                "_nested_tensor_from_mask_left_aligned", "is_pinned", "equal", "promote_types"}
_SYNCS = {"_local_scalar_dense", "item", "nonzero", "masked_select", "unique", "repeat_interleave"}
FAST_PATH_MODULES = ("lora_linear", "lora_qkv", "lora_mlp", "rmsnorm", "rope", "swiglu", "geglu",
                     "linear_cross_entropy", "linear_logprobs", "softcapped_attention", "nf4")


class _Count(TorchDispatchMode):
    """Every PyTorch op that is a device kernel, by name."""

    def __init__(self, counts: collections.Counter, syncs: collections.Counter):
        super().__init__()
        self.counts, self.syncs = counts, syncs

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in _SYNCS:
            self.syncs[name] += 1
        if not (func.is_view or name in _NOT_KERNELS or name.startswith("_foreach_zero")):
            if not (name == "_to_copy" and _noop_copy(args, kwargs or {})):
                self.counts[f"aten.{name}"] += 1
        return func(*args, **(kwargs or {}))


def _noop_copy(args, kwargs) -> bool:
    t = args[0]
    return kwargs.get("dtype", t.dtype) == t.dtype and kwargs.get("device", t.device) == t.device


@contextlib.contextmanager
def counting(counts: collections.Counter, syncs: collections.Counter):
    """Counts the Triton launches (interpreter) and the PyTorch kernels inside."""
    from triton.runtime import interpreter

    original = interpreter.GridExecutor.__call__

    def launch(self, *args, **kwargs):
        counts[f"triton.{self.fn.__name__}"] += 1
        with _disable_current_modes():  # the interpreter's own host copies of the arguments are not kernels
            return original(self, *args, **kwargs)

    interpreter.GridExecutor.__call__ = launch
    try:
        with _Count(counts, syncs):
            yield
    finally:
        interpreter.GridExecutor.__call__ = original


@contextlib.contextmanager
def fast_dispatch():
    """The CUDA dispatch of every kernel module, on the CPU."""
    saved = []
    for name in FAST_PATH_MODULES:
        module = importlib.import_module(f"pronghorn.kernels.{name}")
        if hasattr(module, "use_triton"):
            saved.append((module, module.use_triton))
            module.use_triton = lambda *t: True
    try:
        yield
    finally:
        for module, fn in saved:
            module.use_triton = fn


def _model(layers: int, mode: str, replay: str):
    from pronghorn.models.config import ModelConfig
    from pronghorn.models.decoder import DecoderForCausalLM
    from pronghorn.models.lora import LoRAConfig, attach_lora

    cfg = ModelConfig.from_hf_dict(dict(
        model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
        hidden_act="silu", tie_word_embeddings=True))
    torch.manual_seed(0)
    model = DecoderForCausalLM(cfg, dtype=torch.bfloat16)
    attach_lora(model, LoRAConfig(r=8, lora_alpha=16), seed=1)
    model.train()
    model.gradient_checkpointing_enable(mode=mode, replay=replay)
    return model


def census(mode: str, replay: str, layers: int, autocast: bool = True, batch: int = 2, seq: int = 64) -> dict:
    """The kernels of one step's forward and backward on a ``layers``-layer model (a bf16 base, fp32 adapters),
    under ``torch.autocast`` or not."""
    model = _model(layers, mode, replay)
    ids = torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(0))
    out = {}
    with fast_dispatch(), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        # the plan is made (and printed) outside the count, and an optimizer step: the counted forward remakes
        # the adapters' operands kept across steps (kernels/step_operands.py) as a training step does
        model(input_ids=ids, labels=ids).loss.backward()
        trained = [p for p in model.parameters() if p.requires_grad]
        torch.optim.SGD(trained, lr=1e-3).step()
        model.zero_grad(set_to_none=True)
        for phase in ("forward", "backward"):
            out[phase] = (collections.Counter(), collections.Counter())
        with counting(*out["forward"]):
            loss = model(input_ids=ids, labels=ids).loss
        with counting(*out["backward"]):
            loss.backward()
    return out


def per_layer(mode: str, replay: str, autocast: bool = True) -> dict:
    one, three = census(mode, replay, 1, autocast), census(mode, replay, 3, autocast)
    result = {}
    for phase in ("forward", "backward"):
        kernels = {k: (three[phase][0][k] - one[phase][0][k]) / 2 for k in three[phase][0]}
        syncs = {k: (three[phase][1][k] - one[phase][1][k]) / 2 for k in three[phase][1]}
        result[phase] = {"kernels": {k: v for k, v in sorted(kernels.items()) if v},
                         "total": sum(kernels.values()), "syncs": {k: v for k, v in syncs.items() if v}}
    return result


def host_ms_per_layer(mode: str, replay: str, steps: int = 40) -> float:
    """Host milliseconds per layer of a step at tiny shapes with the Triton launches stubbed out (a proxy for the
    host side of a launch-bound step; this CPU's, one thread, median of ``steps``)."""
    from triton.runtime import interpreter

    torch.set_num_threads(1)
    original = interpreter.GridExecutor.__call__
    interpreter.GridExecutor.__call__ = lambda self, *a, **k: None
    try:
        medians = {}
        for layers in (1, 5):
            model = _model(layers, mode, replay)
            ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(0))
            times = []
            with fast_dispatch(), torch.autocast("cpu", torch.bfloat16):
                for _ in range(steps):
                    start = time.perf_counter()
                    model(input_ids=ids, labels=ids).loss.backward()
                    times.append(time.perf_counter() - start)
            medians[layers] = sorted(times)[len(times) // 2]
    finally:
        interpreter.GridExecutor.__call__ = original
    return (medians[5] - medians[1]) / 4 * 1e3


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", default="off,on:whole,on:split")
    parser.add_argument("--no-autocast", action="store_true", help="a plain loop: the bf16 base without autocast")
    parser.add_argument("--host-time", action="store_true", help="also the host ms per layer (tiny shapes, launches "
                        "stubbed: a CPU proxy for a launch-bound step)")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    table = {}
    for spec in args.modes.split(","):
        mode, _, replay = spec.partition(":")
        table[spec] = per_layer(mode, replay or "auto", not args.no_autocast)
        if args.host_time:
            table[spec]["host_ms_per_layer"] = round(host_ms_per_layer(mode, replay or "auto"), 3)
    for spec, phases in table.items():
        host = f"; host {phases['host_ms_per_layer']} ms" if "host_ms_per_layer" in phases else ""
        print(f"\n== {spec}: per layer, forward {phases['forward']['total']:g} + backward "
              f"{phases['backward']['total']:g} kernels; syncs {phases['forward']['syncs']} / "
              f"{phases['backward']['syncs']}{host}")
        for phase in ("forward", "backward"):
            items = ", ".join(f"{k} {v:g}" for k, v in phases[phase]["kernels"].items())
            print(f"  {phase}: {items}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(table, f, indent=1)


if __name__ == "__main__":
    main()
