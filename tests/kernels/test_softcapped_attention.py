"""The soft-capped attention reference against a direct float64 formula: GQA, causal with a past, masks."""

import math

import pytest
import torch

from pronghorn.kernels.softcapped_attention import softcapped_attention


def _direct(q, k, v, allowed, cap, scale):
    b, hq, tq, d = q.shape
    out = torch.empty(b, hq, tq, v.shape[-1], dtype=torch.float64)
    rep = hq // k.shape[1]
    for bi in range(b):
        for h in range(hq):
            s = q[bi, h].double() @ k[bi, h // rep].double().T * scale
            s = cap * torch.tanh(s / cap)
            s = s.masked_fill(~allowed[bi if allowed.shape[0] > 1 else 0, 0], -math.inf)
            out[bi, h] = torch.softmax(s, -1) @ v[bi, h // rep].double()
    return out


@pytest.mark.parametrize("tq,tk,heads", [(7, 7, (4, 2)), (3, 10, (6, 3)), (1, 9, (2, 2))])
def test_matches_direct_formula(tq, tk, heads):
    g = torch.Generator().manual_seed(tq * tk)
    q = torch.randn(2, heads[0], tq, 16, generator=g) * 2
    k = torch.randn(2, heads[1], tk, 16, generator=g) * 2
    v = torch.randn(2, heads[1], tk, 16, generator=g)
    causal = torch.ones(tq, tk, dtype=torch.bool).tril(tk - tq)[None, None]
    got = softcapped_attention(q, k, v, None, True, softcap=2.0, scale=0.3)
    assert torch.allclose(got.double(), _direct(q, k, v, causal, 2.0, 0.3), atol=1e-5)
    mask = causal & (torch.rand(2, 1, tq, tk, generator=g) > 0.3)
    mask[..., -1] = True  # every query sees a key
    got = softcapped_attention(q, k, v, mask, False, softcap=2.0)
    assert torch.allclose(got.double(), _direct(q, k, v, mask, 2.0, 16 ** -0.5), atol=1e-5)
    additive = torch.zeros(mask.shape).masked_fill(~mask, -math.inf)  # the static cache's decode masks
    got_additive = softcapped_attention(q, k, v, additive, False, softcap=2.0)
    assert torch.allclose(got_additive, got, atol=1e-6)


def test_packed_rows_see_their_own_sequence():
    """``seq_ids`` (packed rows) give the reference the document mask: causal within each sequence, with a window."""
    ids = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2], [0] * 9])
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 2, 9, 8, generator=g) for _ in range(3))
    pos = torch.arange(9)
    for window in (None, 2):
        allowed = (pos[None, :] <= pos[:, None]) & (ids[:, :, None] == ids[:, None, :])
        if window is not None:
            allowed = allowed & (pos[:, None] - pos[None, :] < window)
        got = softcapped_attention(q, k, v, None, True, 3.0, 0.5, window=window, seq_ids=ids)
        assert torch.allclose(got.double(), _direct(q, k, v, allowed[:, None], 3.0, 0.5), atol=1e-6)
    with pytest.raises(ValueError, match=r"seq_ids .* have shape \(2, 8\), expected"):
        softcapped_attention(q, k, v, None, True, 3.0, seq_ids=ids[:, :8])


# --- the Triton kernel (softcapped_attention_triton) against the reference --------------------------------------
#
# Forced on the CPU (the module's ``use_triton`` patched), the kernel runs in Triton's interpreter with 16 x 16
# blocks (``INTERPRETER_BLOCKS``), so a few dozen tokens cover several key blocks, skipped blocks and tails.
#
# Tolerances, and why:
# - fp32: output and dq/dk/dv within 1e-5 of the reference's largest element. Only the order of the fp32 sums
#   (the online softmax's rescaling, blockwise dots) and a few ulps of tanh differ (observed <= 2e-6).
# - bf16: against the exact result (fp64 on the same bf16 inputs), within 2^-6 of the largest element, and no
#   further from exact than twice the bf16 reference is plus 2^-8. The kernel rounds as FlashAttention does:
#   P to bf16 before P V, and delta = rowsum(dO * O) from the bf16 output, so each row's delta (subtracted from
#   every dP of the row) carries ~2^-9 |dO| |O| of error into dS = P (dP - delta) (1 - t^2); dK and dQ sum such
#   terms over a row or column with cancellation. An fp64 emulation of exactly these rounding steps puts dk at
#   1.0e-2 of its largest element on the head_dim_24 case (delta alone 6.3e-3, P alone 5.0e-3); the kernel
#   measures 9.2e-3 there, the bf16 eager reference (scores, caps and P rounded to bf16) 9.6e-3, and <= 5.3e-3
#   on the other outputs and cases (the bf16 reference: 5.6e-3 to 3.0e-2).
# - fp16: the same steps with an 8x smaller unit roundoff, so the same bounds scaled by 2^-3 (within 2^-9 of
#   exact, and twice the fp16 reference plus 2^-11); observed <= 8.4e-4 (the fp16 reference 5.1e-4 to 4.3e-3).

import importlib

sa_module = importlib.import_module("pronghorn.kernels.softcapped_attention")
sa_triton = pytest.importorskip("pronghorn.kernels.softcapped_attention_triton")
from pronghorn.kernels.softcapped_attention import softcapped_attention_reference  # noqa: E402
from pronghorn.kernels.policy import KernelPolicy  # noqa: E402
from pronghorn.kernels.triton_support import kernel_dtype_ok  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def kernel(monkeypatch):
    """The Triton path on CPU tensors (the interpreter): ``use_triton`` without its CUDA check."""
    monkeypatch.setattr(sa_module, "use_triton", lambda *t: all(kernel_dtype_ok(x) for x in t))


def test_tanh_within_a_few_ulps():
    """The kernel's own tanh (no libdevice in the interpreter) against fp64 tanh rounded to fp32: <= 4 ulps over
    [-12, 12] and 1e-8 .. 3 in magnitude (observed 3, relative <= 2e-7; torch's fp32 tanh: 1 ulp)."""
    import triton
    import triton.language as tl

    @triton.jit
    def tanh_kernel(X, Y, N: tl.constexpr):
        offs = tl.arange(0, N)
        tl.store(Y + offs, sa_triton._tanh(tl.load(X + offs)))

    mags = torch.logspace(-8, 0.5, 4096)
    x = torch.cat([torch.linspace(-12, 12, 8192), mags, -mags]).to(DEVICE)
    y = torch.empty_like(x)
    tanh_kernel[(1,)](x, y, N=x.numel())
    exact = torch.tanh(x.double()).float()
    ulps = (exact.abs().view(torch.int32) - y.abs().view(torch.int32)).abs()
    assert torch.equal(exact.sign(), y.sign()) and ulps.max().item() <= 4


def _packed_ids(t: int) -> torch.Tensor:
    """Sequence ids of two packed rows of ``t`` tokens: row 0 holds three sequences (13, 20 and the rest), row 1
    one (no restart)."""
    ids = torch.zeros(2, t, dtype=torch.long)
    ids[0, 13:] = 1
    ids[0, 33:] = 2
    return ids.to(DEVICE)


def _case(tq, tk, d, dtype, seed, heads=(4, 2), padding=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, heads[0], tq, d, generator=g) * 2
    k = torch.randn(2, heads[1], tk, d, generator=g) * 2
    v = torch.randn(2, heads[1], tk, d, generator=g)
    do = torch.randn(2, heads[0], tq, d, generator=g)
    key_padding = None
    if padding:  # row 0 left-padded, row 1 right-padded (generation and training)
        key_padding = torch.ones(2, tk, dtype=torch.bool)
        key_padding[0, :padding] = False
        key_padding[1, tk - padding:] = False
    key_padding = None if key_padding is None else key_padding.to(DEVICE)
    return [t.to(dtype).to(DEVICE) for t in (q, k, v, do)], key_padding


def _run(fn, q, k, v, do):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    out.backward(do)
    return out.detach(), q.grad, k.grad, v.grad


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max()).item()


# (tq, tk, causal, window, padding, head_dim, softcap)
CASES = {
    "causal": (40, 40, True, None, 0, 16, 50.0),
    "causal_past": (7, 37, True, None, 0, 16, 5.0),
    "window": (40, 40, True, 10, 0, 16, 50.0),
    "padding": (23, 23, True, None, 5, 16, 5.0),  # row 0's first 5 queries see no key: zeros
    "window_padding_past": (9, 30, True, 7, 4, 16, 5.0),
    "bidirectional_padding": (12, 12, False, None, 3, 16, 50.0),
    "decode": (1, 19, False, 6, 2, 16, 5.0),
    "head_dim_24": (21, 21, True, None, 0, 24, 5.0),
    "packed": (40, 40, True, None, 0, 16, 50.0),  # sequence ids: _packed_ids
    "packed_window": (40, 40, True, 7, 0, 16, 5.0),
}


def _both(case, dtype, seed=0):
    tq, tk, causal, window, padding, d, cap = CASES[case]
    (q, k, v, do), kp = _case(tq, tk, d, dtype, seed, padding=padding)
    scale = 0.3 if d == 16 else d ** -0.5
    kw = dict(window=window, key_padding=kp, seq_ids=_packed_ids(tq) if case.startswith("packed") else None)
    got = _run(lambda *t: softcapped_attention(*t, None, causal, cap, scale, **kw), q, k, v, do)
    ref = lambda *t: softcapped_attention_reference(*t, None, causal, cap, scale, **kw)  # noqa: E731
    return got, ref, (q, k, v, do)


@pytest.mark.parametrize("case", list(CASES))
def test_kernel_matches_reference_fp32(kernel, case):
    got, ref, inputs = _both(case, torch.float32)
    want = _run(ref, *inputs)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert _rel(a, b) <= 1e-5, name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", ["causal", "window_padding_past", "head_dim_24", "packed_window"])
def test_kernel_16bit_against_exact(kernel, case, dtype):
    got, ref, inputs = _both(case, dtype, seed=1)
    exact = _run(ref, *(t.double() for t in inputs))
    ref_16 = _run(ref, *inputs)
    u = 2**-8 if dtype == torch.bfloat16 else 2**-11  # the unit roundoff's scale: the bounds go with it
    for name, a, r, e in zip(("out", "dq", "dk", "dv"), got, ref_16, exact):
        assert a.dtype == dtype
        err, ref_err = _rel(a, e), _rel(r, e)
        assert err <= 4 * u, f"{name}: {err:.2e} from exact"
        assert err <= 2 * ref_err + u, f"{name}: {err:.2e} from exact, the 16-bit reference {ref_err:.2e}"


def test_wide_head_with_the_gpu_blocks(kernel, monkeypatch):
    """Gemma's head_dim 256 with the GPU's tiles (64 x 32 forward, 32 x 32 backward): one block of each kind."""
    monkeypatch.setattr(sa_triton, "INTERPRETER_BLOCKS", None)
    (q, k, v, do), kp = _case(20, 20, 256, torch.float32, seed=3, padding=2)
    kw = dict(window=6, key_padding=kp)
    got = _run(lambda *t: softcapped_attention(*t, None, True, 50.0, 256 ** -0.5, **kw), q, k, v, do)
    want = _run(lambda *t: softcapped_attention_reference(*t, None, True, 50.0, 256 ** -0.5, **kw), q, k, v, do)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert _rel(a, b) <= 1e-5, name


def test_autotuned_launch_takes_its_config(kernel, monkeypatch):
    """The GPU's autotuned launch (grids from the config's blocks, the dQ kernel's blocks swapped) run here with
    one config each, which the tuner takes without timing. The backward's blocks differ from the untuned launch's,
    so its dots run in another order, and the capped scores z it recomputes may differ by an ulp: at |z| < 32 (the
    cap is 30) that is 2^-19, the same relative error in P = exp(z - lse), so the two launches' gradients may be
    2 x 2^-19 apart (a bound of 1e-6 held on one CPU's numpy and not on another's: dv 1.6e-6 apart, each launch
    within 1.6e-6 of the float64 result, the file's fp32 bound 1e-5)."""
    (q, k, v, do), kp = _case(37, 37, 24, torch.float32, seed=5, padding=3)
    kw = dict(window=9, key_padding=kp)
    want = _run(lambda *t: softcapped_attention(*t, None, True, 30.0, 0.2, **kw), q, k, v, do)
    bm, bn, warps, stages = sa_triton.INTERPRETER_BLOCKS
    monkeypatch.setattr(sa_triton, "_FWD_CONFIGS", [(bm, bn, warps, stages)])
    monkeypatch.setattr(sa_triton, "_BWD_CONFIGS", [(bm, 2 * bn, warps, stages)])  # dkdv 16 x 32, dQ 32 x 16
    monkeypatch.setattr(sa_triton, "_TUNED", {})
    monkeypatch.setattr(sa_triton, "_tuning", lambda device: True)
    got = _run(lambda *t: softcapped_attention(*t, None, True, 30.0, 0.2, **kw), q, k, v, do)
    assert {k.fn.__name__ for k in sa_triton._TUNED} >= {"_fwd_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel"}
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert _rel(a, b) <= 2 * 2 ** -19, name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the autotuner's configs are GPU blocks")
@pytest.mark.parametrize("i", range(len(sa_triton._FWD_CONFIGS)))
def test_every_autotune_config_is_exact_on_the_gpu(i, monkeypatch):
    """The tuner may pick any config on a machine, so each must be exact alone: forward config i with backward
    config i (the dQ kernel's swapped), Gemma 2's head_dim 256, bf16, a window and padding, against fp64. A config
    a GPU cannot hold (registers, shared memory) fails to compile, and the tuner skips it: the test says which."""
    import triton

    monkeypatch.setattr(sa_triton, "_FWD_CONFIGS", [sa_triton._FWD_CONFIGS[i]])
    monkeypatch.setattr(sa_triton, "_BWD_CONFIGS", [sa_triton._BWD_CONFIGS[i]])
    monkeypatch.setattr(sa_triton, "_TUNED", {})
    monkeypatch.setattr(sa_triton, "_tuning", lambda device: True)
    (q, k, v, do), kp = _case(300, 300, 256, torch.bfloat16, seed=7, heads=(4, 2), padding=5)
    kw = dict(window=100, key_padding=kp)
    attend = lambda *t: softcapped_attention(*t, None, True, 50.0, 256 ** -0.5, **kw)  # noqa: E731
    ref = lambda *t: softcapped_attention_reference(*t, None, True, 50.0, 256 ** -0.5, **kw)  # noqa: E731
    try:
        got = _run(attend, q, k, v, do)
    except triton.runtime.errors.OutOfResources as e:
        pytest.skip(f"configs {sa_triton._FWD_CONFIGS[0]} / {sa_triton._BWD_CONFIGS[0]} do not fit this GPU: {e}")
    assert {k.fn.__name__ for k in sa_triton._TUNED} >= {"_fwd_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel"}
    exact, ref_16 = _run(ref, *(t.double() for t in (q, k, v, do))), _run(ref, q, k, v, do)
    u = 2**-8
    for name, a, r, e in zip(("out", "dq", "dk", "dv"), got, ref_16, exact):
        err, ref_err = _rel(a, e), _rel(r, e)
        assert err <= 4 * u and err <= 2 * ref_err + u, f"{name}: {err:.2e} from exact, 16-bit reference {ref_err:.2e}"


def _fn_name(out):
    return type(out.grad_fn).__name__


def test_dispatch(kernel):
    """The kernel takes causal / window / key padding; a dense mask, a reference policy, fp64 or a head wider
    than 256 take the reference."""
    (q, k, v, _), kp = _case(5, 5, 16, torch.float32, seed=4, padding=1)
    q.requires_grad_()
    assert "SoftcappedAttention" in _fn_name(softcapped_attention(q, k, v, None, True, 5.0, key_padding=kp))
    half = softcapped_attention(q.half(), k.half(), v.half(), None, True, 5.0, window=2)
    assert "SoftcappedAttention" in _fn_name(half) and half.dtype == torch.float16
    mask = torch.ones(5, 5, dtype=torch.bool, device=DEVICE).tril()[None, None]
    assert "SoftcappedAttention" not in _fn_name(softcapped_attention(q, k, v, mask, False, 5.0))
    ref = softcapped_attention(q, k, v, None, True, 5.0, policy=KernelPolicy(reference=True))
    assert "SoftcappedAttention" not in _fn_name(ref)
    q64 = q.detach().double().requires_grad_()
    assert "SoftcappedAttention" not in _fn_name(softcapped_attention(q64, k.double(), v.double(), None, True, 5.0))
    wide = torch.randn(1, 1, 3, 320, device=DEVICE, requires_grad=True)
    assert "SoftcappedAttention" not in _fn_name(softcapped_attention(wide, wide, wide, None, True, 5.0))
    with pytest.raises(ValueError, match=r"key_padding has shape \(1, 5\), expected \[batch, keys\] = \(2, 5\)"):
        softcapped_attention(q, k, v, None, True, 5.0, key_padding=kp[:1])
    with pytest.raises(ValueError, match="not both"):
        softcapped_attention(q, k, v, mask, False, 5.0, window=2)


# --- the model path ----------------------------------------------------------------------------------------------


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("rows", ["padded", "full", "packed"])
def test_gemma2_model_with_the_kernel_equals_the_reference(kernel, monkeypatch, rows):
    """A tiny Gemma 2 (sliding window 5 on layer 0, global layer 1; 19 tokens: left- and right-padded rows, full
    rows, or padding-free packed rows of 3 + 9 + 7 and 19 tokens) with the kernel in both layers: the loss and
    every LoRA gradient of the run with the reference attention (fp32, 1e-5; every other op the same in both
    runs). A reference kernel policy keeps the kernel out."""
    from helpers import make_pair, randomize_lora_b
    from pronghorn.models.lora import LoRAConfig, attach_lora

    _, model = make_pair("gemma2")
    attach_lora(model, LoRAConfig(r=4, lora_alpha=8), seed=1)
    randomize_lora_b(model)
    model.to(DEVICE).train()
    ids = torch.randint(3, 97, (2, 19), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    if rows == "padded":
        mask[0, :5] = 0  # left padding
        mask[1, 15:] = 0  # right padding
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, 5] = -100  # predicted from a padding position, whose output is unspecified
    batch = dict(input_ids=ids, attention_mask=mask, labels=labels)
    if rows == "packed":
        positions = torch.cat([torch.arange(3), torch.arange(9), torch.arange(7)])
        batch = dict(input_ids=ids, labels=ids, position_ids=torch.stack([positions, torch.arange(19)]))
    batch = {key: t.to(DEVICE) for key, t in batch.items()}

    calls = []
    original = sa_triton.SoftcappedAttentionFunction

    class Counting:
        @staticmethod
        def apply(*args):
            calls.append((args[7] is not None, args[8] is not None))  # key padding, sequence ids given
            return original.apply(*args)

    monkeypatch.setattr(sa_triton, "SoftcappedAttentionFunction", Counting)
    loss, grads = _loss_and_grads(model, batch)
    assert calls == [(rows == "padded", rows == "packed")] * 2  # both layers took the kernel
    monkeypatch.setattr(sa_module, "use_triton", lambda *t: False)
    ref_loss, ref_grads = _loss_and_grads(model, batch)
    assert len(calls) == 2
    monkeypatch.setattr(sa_module, "use_triton", lambda *t: True)
    model.set_kernel_policy(KernelPolicy(reference=True))
    model(**batch)
    assert len(calls) == 2
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * abs(ref_loss.item())
    assert grads.keys() == ref_grads.keys() and any("lora_A" in n for n in grads)
    for name, g in ref_grads.items():
        assert _rel(grads[name], g) <= 1e-5, name


def test_gemma2_static_decode_equals_eager():
    """Gemma 2 through the static cache (CUDA's default decode mode, whose decode masks are additive 0 / -inf)
    picks the eager loop's tokens (a left-padded row included)."""
    from helpers import make_pair
    from pronghorn.infer.generate import generate

    _, model = make_pair("gemma2")
    ids = torch.randint(3, 97, (2, 7), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, eos_token_id=[])
    with torch.no_grad():
        eager = generate(model, ids, decode_mode="eager", **kw)
        static = generate(model, ids, decode_mode="static", **kw)
    assert torch.equal(static, eager)
