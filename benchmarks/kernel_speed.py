"""Per-op time and peak memory: pronghorn's Triton kernel vs the PyTorch reference, torch.compile of the
reference, and Liger-Kernel (when importable), at the Llama-3.1-8B and Llama-3.2-1B shapes.

    python benchmarks/kernel_speed.py --tokens 4096,16384 --json kernels.json
    python benchmarks/kernel_speed.py --ops lora_linear,lora_qkv,lora_mlp --json lora.json   # the LoRA ops only
    python benchmarks/kernel_speed.py --graphs     # + each case replayed as a CUDA graph (launch cost removed)
    python benchmarks/kernel_speed.py --smoke      # tiny shapes, CPU allowed: checks the script runs
    python benchmarks/kernel_speed.py --shapes gemma-2-9b --tokens 4096,16384 --ops softcapped_attention \
        --json softcap.json                   # Gemma 2's soft-capped attention, beside FlexAttention

The LoRA ops (r=16, fp32 adapters on a bf16 base under bf16 autocast, as the trainer runs them) also time
"unfused": pronghorn's single-projection ops composed as the model did before fusing (three ``lora_linear``
calls; and those around ``swiglu`` for the MLP).

Times are CUDA-event medians over --iters runs after warm-up; "fwd+bwd" includes the backward of a
random upstream gradient. Bandwidth (GB/s) counts each input read once and each output written once.
"""

from __future__ import annotations

import argparse
import contextlib
import json

import torch
from common import median_ms, run_meta, write_results

SHAPES = {
    "llama-3.1-8b": dict(hidden=4096, inter=14336, heads=32, kv_heads=8, head_dim=128, vocab=128256),
    "llama-3.2-1b": dict(hidden=2048, inter=8192, heads=32, kv_heads=8, head_dim=64, vocab=128256),
    "gemma-2-9b": dict(hidden=3584, inter=14336, heads=16, kv_heads=8, head_dim=256, vocab=256000),
    "gemma-3-4b": dict(hidden=2560, inter=10240, heads=8, kv_heads=4, head_dim=256, vocab=262208),
    "phi-3.5-mini": dict(hidden=3072, inter=8192, heads=32, kv_heads=32, head_dim=96, vocab=32064),
    "smoke": dict(hidden=48, inter=80, heads=4, kv_heads=2, head_dim=12, vocab=97),
}
LORA_RANK = 16
FLOP_OPS = {"linear_cross_entropy": 3, "lora_linear": 2, "lora_qkv": 2, "lora_mlp": 2,  # fwd+bwd / fwd FLOPs
            "softcapped_attention": 3.5, "attention": 3.5}


def _bench(fn, iters: int) -> tuple[float, float]:
    """(median ms, peak GiB above what was allocated before); on a CPU (--smoke) wall time and no memory."""
    if not torch.cuda.is_available():
        return median_ms(fn, iters), 0.0
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    ms = median_ms(fn, iters, warmup=0)
    return ms, (torch.cuda.max_memory_allocated() - base) / 2**30


def _bench_graph(fn, iters: int) -> float | str:
    """The same call captured once as a CUDA graph and replayed: GPU time without the Python launch cost
    (the gap to the eager time is launch overhead). A string says why it could not be captured (e.g. a host
    synchronization inside the op)."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the default stream, as capture requires
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
    except Exception as e:  # noqa: BLE001 - reported in the table
        torch.cuda.synchronize()
        return f"no graph: {type(e).__name__}: {str(e)[:80]}"
    return _bench(graph.replay, iters)[0]


def _runner(impl, inputs, backward: bool):
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]

    def run():
        for t in leaves:
            t.grad = None
        out = impl(*inputs)
        outs = out if isinstance(out, tuple) else (out,)
        if backward:
            loss = sum((o.float() * 1.0).sum() if o.dim() == 0 else (o * torch.ones_like(o)).float().sum()
                       for o in outs)
            loss.backward()
    return run


def cases(shape: dict, tokens: int, dtype=torch.bfloat16):
    import importlib

    # the package re-exports functions under the module names, so import the modules explicitly
    lce_mod, rmsnorm, rope, swiglu = (importlib.import_module(f"pronghorn.kernels.{m}")
                                      for m in ("linear_cross_entropy", "rmsnorm", "rope", "swiglu"))

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    h, hd = shape["hidden"], shape["head_dim"]

    def t(*s, grad=True, scale=1.0):
        return (torch.randn(*s, device=dev, dtype=dtype) * scale).requires_grad_(grad)

    x, w = t(tokens, h), t(h, grad=False)
    yield "rmsnorm", (x, w, 1e-5), dict(pronghorn=rmsnorm.rms_norm, reference=rmsnorm.rms_norm_reference), \
        2 * x.numel() * 2

    b, seq = tokens // 2048 or 1, min(tokens, 2048)
    q = t(b, shape["heads"], seq, hd)
    k = t(b, shape["kv_heads"], seq, hd)
    pos = torch.arange(seq, device=dev)[None].expand(b, seq)
    inv = 1.0 / (500000.0 ** (torch.arange(0, hd, 2, device=dev).float() / hd))
    cos, sin = rope.rope_cos_sin(inv, pos, dtype)
    yield "rope", (q, k, cos, sin), dict(pronghorn=rope.apply_rope, reference=rope.apply_rope_reference), \
        2 * (q.numel() + k.numel()) * 2

    g, u = t(tokens, shape["inter"]), t(tokens, shape["inter"])
    yield "swiglu", (g, u), dict(pronghorn=swiglu.swiglu, reference=swiglu.swiglu_reference), 3 * g.numel() * 2

    hid = t(tokens, h, scale=0.5)
    head = t(shape["vocab"], h, grad=False, scale=0.02)
    labels = torch.randint(0, shape["vocab"], (tokens,), device=dev)
    yield "linear_cross_entropy", (hid, head, labels), dict(
        pronghorn=lce_mod.linear_cross_entropy,
        reference=lambda a, b_, c: torch.nn.functional.cross_entropy(
            torch.nn.functional.linear(a, b_).float(), c)), 2 * tokens * h * shape["vocab"]

    yield from lora_cases(shape, tokens, dev, dtype)
    yield softcapped_attention_case(shape, tokens, dev, dtype)
    yield attention_case(shape, tokens, dev, dtype)


def attention_case(shape: dict, tokens: int, dev: str, dtype=torch.bfloat16):
    """Causal GQA attention (rows of up to 2048 tokens) through each SDPA backend this torch has, one at a time
    (``sdpa_kernel``), beside the default choice and the math backend (the reference). Which backend is fastest
    at each family's head size decides the model's attention (models/attention.py)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    b, seq, hd = tokens // 2048 or 1, min(tokens, 2048), shape["head_dim"]
    q, k, v = (torch.randn(b, n, seq, hd, device=dev, dtype=dtype).requires_grad_()
               for n in (shape["heads"], shape["kv_heads"], shape["kv_heads"]))

    def backend(which):
        def run(q_, k_, v_):
            with sdpa_kernel([which]) if which is not None else contextlib.nullcontext():
                return torch.nn.functional.scaled_dot_product_attention(q_, k_, v_, is_causal=True, enable_gqa=True)
        return run

    def reference(q_, k_, v_):  # the math backend in fp32: the error column's yardstick
        return backend(SDPBackend.MATH)(q_.float(), k_.float(), v_.float()).to(q_.dtype)

    impls = dict(default=backend(None), reference=reference)
    for name in ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION"):
        if hasattr(SDPBackend, name):
            impls[name.split("_")[0].lower()] = backend(getattr(SDPBackend, name))
    if hasattr(SDPBackend, "CUDNN_ATTENTION") and shape["kv_heads"] != shape["heads"]:  # k/v repeated per query head
        rep, cudnn = shape["heads"] // shape["kv_heads"], backend(SDPBackend.CUDNN_ATTENTION)
        impls["cudnn_repeat_kv"] = lambda q_, k_, v_: cudnn(q_, k_.repeat_interleave(rep, 1), v_.repeat_interleave(rep, 1))
    flops = 2 * 2 * b * shape["heads"] * seq * seq * hd // 2  # QK^T and PV, causal half
    return "attention", (q, k, v), impls, flops


def softcapped_attention_case(shape: dict, tokens: int, dev: str, dtype=torch.bfloat16):
    """Gemma 2's causal soft-capped attention (cap 50) over rows of up to 2048 tokens: the kernel, the eager
    reference, FlexAttention with the cap as its score_mod (compiled), and SDPA without a cap (a ceiling)."""
    import importlib

    sa = importlib.import_module("pronghorn.kernels.softcapped_attention")
    b, seq, hd = tokens // 2048 or 1, min(tokens, 2048), shape["head_dim"]
    q, k, v = (torch.randn(b, n, seq, hd, device=dev, dtype=dtype).requires_grad_()
               for n in (shape["heads"], shape["kv_heads"], shape["kv_heads"]))
    impls = dict(pronghorn=lambda q_, k_, v_: sa.softcapped_attention(q_, k_, v_, None, True, 50.0),
                 reference=lambda q_, k_, v_: sa.softcapped_attention_reference(q_, k_, v_, None, True, 50.0),
                 sdpa_no_cap=lambda q_, k_, v_: torch.nn.functional.scaled_dot_product_attention(
                     q_, k_, v_, is_causal=True, enable_gqa=True))
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        block_mask = create_block_mask(lambda b_, h_, i, j: j <= i, None, None, seq, seq, device=dev)
        flex = torch.compile(flex_attention)
        impls["flex_attention"] = lambda q_, k_, v_: flex(
            q_, k_, v_, score_mod=lambda s, *_: 50.0 * torch.tanh(s / 50.0), block_mask=block_mask, enable_gqa=True)
    except Exception:  # noqa: BLE001 - an older torch, or a device FlexAttention does not run on
        pass
    flops = 2 * 2 * b * shape["heads"] * seq * seq * hd // 2  # QK^T and PV, causal half
    return "softcapped_attention", (q, k, v), impls, flops


def _autocast(fn):
    """``fn`` under the trainer's bf16 autocast."""
    def run(*args):
        with torch.autocast(args[0].device.type, dtype=torch.bfloat16):
            return fn(*args)
    return run


def lora_cases(shape: dict, tokens: int, dev: str, dtype=torch.bfloat16, r: int = LORA_RANK):
    """LoRA ops: inputs are (x, then weight, A, B per projection); frozen base in ``dtype``, fp32 adapters."""
    from pronghorn.kernels import LoRAProjection, lora_linear, lora_mlp, lora_qkv, swiglu
    from pronghorn.kernels.lora_linear import lora_linear_reference
    from pronghorn.kernels.lora_mlp import lora_mlp_reference
    from pronghorn.kernels.lora_qkv import lora_qkv_reference

    h, inter, s = shape["hidden"], shape["inter"], 2.0
    q_out, kv_out = shape["heads"] * shape["head_dim"], shape["kv_heads"] * shape["head_dim"]

    def proj(n_in, n_out):
        w = (torch.randn(n_out, n_in, device=dev) * n_in**-0.5).to(dtype)
        a = (torch.randn(r, n_in, device=dev) * n_in**-0.5).requires_grad_()
        return [w, a, (torch.randn(n_out, r, device=dev) * 0.01).requires_grad_()]

    def projs(flat):
        return [LoRAProjection(flat[i], None, flat[i + 1], flat[i + 2], s) for i in range(0, len(flat), 3)]

    def per_proj(fn):
        return _autocast(lambda x, *flat: fn(x, *projs(flat)))

    x = torch.randn(tokens, h, device=dev).to(dtype).requires_grad_()
    linear = lambda f: per_proj(lambda x, p: f(x, *p))  # noqa: E731
    yield "lora_linear", (x, *proj(h, inter)), dict(
        pronghorn=linear(lora_linear), reference=linear(lora_linear_reference)), 2 * tokens * h * inter

    yield "lora_qkv", (x, *proj(h, q_out), *proj(h, kv_out), *proj(h, kv_out)), dict(
        pronghorn=per_proj(lora_qkv), reference=per_proj(lora_qkv_reference),
        unfused=per_proj(lambda x, *ps: tuple(lora_linear(x, *p) for p in ps))), 2 * tokens * h * (q_out + 2 * kv_out)

    unfused_mlp = lambda x, g, u, d: lora_linear(swiglu(lora_linear(x, *g), lora_linear(x, *u)), *d)  # noqa: E731
    yield "lora_mlp", (x, *proj(h, inter), *proj(h, inter), *proj(inter, h)), dict(
        pronghorn=per_proj(lora_mlp), reference=per_proj(lora_mlp_reference), unfused=per_proj(unfused_mlp)), \
        2 * tokens * h * inter * 3


def _liger(name):
    try:
        if name == "rmsnorm":
            from liger_kernel.ops.rms_norm import LigerRMSNormFunction
            return lambda x, w, eps: LigerRMSNormFunction.apply(x, w, eps, 0.0, "llama", False)
        if name == "rope":
            from liger_kernel.ops.rope import LigerRopeFunction
            return lambda q, k, c, s: LigerRopeFunction.apply(q, k, c, s)
        if name == "swiglu":
            from liger_kernel.ops.swiglu import LigerSiLUMulFunction
            return LigerSiLUMulFunction.apply
        if name == "linear_cross_entropy":
            from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
            loss = LigerFusedLinearCrossEntropyLoss()
            return lambda a, b_, c: loss(b_, a, c)
    except Exception:
        return None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="llama-3.1-8b,llama-3.2-1b")
    ap.add_argument("--tokens", default="4096,16384")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--graphs", action="store_true", help="also time each case replayed as a CUDA graph (GPU time "
                                                          "without launch overhead)")
    ap.add_argument("--json", default="kernels.json")
    ap.add_argument("--ops", default="", help="comma-separated subset of ops (default: all)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, 2 iterations, no compile (runs on a CPU)")
    a = ap.parse_args()
    if a.smoke:
        a.shapes, a.tokens, a.iters, a.no_compile = "smoke", "64", 2, True
    rows = []
    for sname in a.shapes.split(","):
        for tokens in map(int, a.tokens.split(",")):
            for op, inputs, impls, work in cases(SHAPES[sname], tokens):
                if a.ops and op not in a.ops.split(","):
                    continue
                impls = dict(impls)
                if not a.no_compile:
                    impls["torch.compile"] = torch.compile(impls["reference"], dynamic=False)
                lig = _liger(op)
                if lig is not None:
                    impls["liger"] = lig
                for backward in (False, True):
                    for name, fn in impls.items():
                        try:
                            ms, gib = _bench(_runner(fn, inputs, backward), a.iters)
                        except Exception as e:  # an implementation that cannot run this case
                            rows.append(dict(shape=sname, tokens=tokens, op=op, pass_="fwd+bwd" if backward else "fwd",
                                             impl=name, error=f"{type(e).__name__}: {str(e)[:120]}"))
                            continue
                        unit = "TFLOP/s" if op in FLOP_OPS else "GB/s"
                        rate = work * (FLOP_OPS.get(op, 1) if backward else 1) / (ms * 1e-3)
                        rate = rate / 1e12 if unit == "TFLOP/s" else rate / 1e9
                        rows.append(dict(shape=sname, tokens=tokens, op=op, pass_="fwd+bwd" if backward else "fwd",
                                         impl=name, ms=round(ms, 4), peak_gib=round(gib, 3),
                                         rate=round(rate, 1), unit=unit))
                        if op == "attention" and not backward:  # each backend's largest error against fp32 math
                            with torch.no_grad():
                                rows[-1]["max_err"] = float((fn(*inputs).float() - impls["reference"](*inputs)
                                                             .float()).abs().max())
                        if a.graphs and torch.cuda.is_available() and name != "torch.compile":
                            g = _bench_graph(_runner(fn, inputs, backward), a.iters)
                            rows[-1]["graph_ms"] = round(g, 4) if isinstance(g, float) else g
                        print(json.dumps(rows[-1]), flush=True)
    print(f"\n{'shape':<13}{'tok':>6} {'op':<21}{'pass':<8}{'impl':<14}{'ms':>9}{'GiB':>8}{'rate':>10}")
    for r in rows:
        if "error" in r:
            print(f"{r['shape']:<13}{r['tokens']:>6} {r['op']:<21}{r['pass_']:<8}{r['impl']:<14} {r['error']}")
        else:
            print(f"{r['shape']:<13}{r['tokens']:>6} {r['op']:<21}{r['pass_']:<8}{r['impl']:<14}{r['ms']:>9}"
                  f"{r['peak_gib']:>8}{r['rate']:>7} {r['unit']}" + (f"  graph {r['graph_ms']}" if "graph_ms" in r else "")
                  + (f"  max err {r['max_err']:.2e}" if "max_err" in r else ""))
    write_results(a.json, run_meta(), rows)

if __name__ == "__main__":
    main()
