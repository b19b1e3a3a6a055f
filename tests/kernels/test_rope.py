"""RoPE: the Triton kernel (forward and its inverse-rotation backward) against the PyTorch reference.

On a machine without a GPU the kernel runs on CPU tensors through Triton's interpreter (tests/conftest.py
sets TRITON_INTERPRET=1), so shapes are small; with a GPU the same tests run on it.

Tolerances, and why:
- fp32: |kernel - reference| <= 1e-6 + 1e-6·|reference|. Both compute each output as two fp32 products
  and one add (backward: the same, per autograd's sum of the two branches); the only freedom is FMA
  contraction on a GPU, which moves a result by at most half an ulp of each product (inputs here are
  ~N(0,1), so products stay below 8 and half an ulp below 4.8e-7). On the CPU interpreter the results
  are bitwise equal.
- bf16: the kernel does fp32 math and rounds once, so it must be within 1 bf16 ulp of the reference
  computed in fp32 from the same bf16 inputs and then rounded to bf16 (checked on the integer bit
  patterns). Against the reference run *in* bf16 (several roundings, as Hugging Face does) it may differ
  by a few bf16 ulps; that comparison is not what "exact" means here. (On a GPU the kernel's fp32 -> bf16
  cast rounds to nearest even, so it is 0 ulps apart unless FMA moved the fp32 value across a rounding
  boundary; Triton's interpreter truncates instead, so on the CPU it is often 1 ulp apart.)
"""

from __future__ import annotations

import pytest
import torch

from helpers import make_pair
from kernel_cases import ordered_bits
from pronghorn.kernels.rope import apply_rope_reference, rope_cos_sin

rope_triton = pytest.importorskip("pronghorn.kernels.rope_triton")
RoPEFunction = rope_triton.RoPEFunction

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP32_TOL = dict(rtol=1e-6, atol=1e-6)
POSITIONS = {1: [[7], [0]], 5: [[0, 1, 2, 0, 1], [31, 4, 1000, 5, 2]]}  # packed / non-monotonic rows


def _inputs(b, hq, hk, t, d, dtype, seed=0, broadcast_cos=False):
    """q, k as the attention layer makes them: [B, T, H, D] views transposed to [B, H, T, D] (strided)."""
    g = torch.Generator().manual_seed(seed)
    q_lin = torch.randn(b, t, hq * d, generator=g).to(DEVICE, dtype).requires_grad_()
    k_lin = torch.randn(b, t, hk * d, generator=g).to(DEVICE, dtype).requires_grad_()
    q = q_lin.view(b, t, hq, d).transpose(1, 2)
    k = k_lin.view(b, t, hk, d).transpose(1, 2)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    pos = torch.tensor(POSITIONS[t][:1] if broadcast_cos else POSITIONS[t][:b], device=DEVICE)
    cos, sin = rope_cos_sin(inv_freq, pos, dtype)
    return q_lin, k_lin, q, k, cos, sin


def _assert_matches(out: torch.Tensor, ref32: torch.Tensor) -> None:
    """fp32: tight tolerance. bf16: within 1 ulp of the fp32 reference rounded to bf16."""
    if out.dtype == torch.float32:
        torch.testing.assert_close(out, ref32, **FP32_TOL)
    else:
        ulps = (ordered_bits(out) - ordered_bits(ref32.to(out.dtype))).abs().max().item()
        assert ulps <= 1, f"{ulps} bf16 ulps from the rounded fp32 reference"


def _check_fwd_bwd(q_lin, k_lin, q, k, cos, sin, seed=1):
    qo, ko = RoPEFunction.apply(q, k, cos, sin)
    assert qo.dtype == q.dtype and ko.dtype == k.dtype and qo.shape == q.shape and ko.shape == k.shape
    g = torch.Generator().manual_seed(seed)
    gq = torch.randn(qo.shape, generator=g).to(DEVICE, qo.dtype)
    gk = torch.randn(ko.shape, generator=g).to(DEVICE, ko.dtype)
    dq_lin, dk_lin = torch.autograd.grad((qo, ko), (q_lin, k_lin), (gq, gk))

    # reference: fp32 math on the same (possibly bf16) values
    q32 = q.detach().float().requires_grad_()
    k32 = k.detach().float().requires_grad_()
    rq, rk = apply_rope_reference(q32, k32, cos.float(), sin.float())
    rdq, rdk = torch.autograd.grad((rq, rk), (q32, k32), (gq.float(), gk.float()))
    b, hq, t, d = q.shape
    _assert_matches(qo, rq.detach())
    _assert_matches(ko, rk.detach())
    _assert_matches(dq_lin, rdq.transpose(1, 2).reshape(b, t, -1))
    _assert_matches(dk_lin, rdk.transpose(1, 2).reshape(b, t, -1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("b,t", [(1, 1), (2, 5), (1, 5)])
@pytest.mark.parametrize("hq,hk", [(4, 2), (3, 3)], ids=["gqa4-2", "mha3"])
@pytest.mark.parametrize("d", [64, 80, 128])
def test_matches_reference(d, hq, hk, b, t, dtype):
    _check_fwd_bwd(*_inputs(b, hq, hk, t, d, dtype))


@pytest.mark.parametrize("d", [96, 256])
def test_other_head_dims(d):
    _check_fwd_bwd(*_inputs(2, 4, 2, 5, d, torch.bfloat16))
    _check_fwd_bwd(*_inputs(1, 4, 1, 5, d, torch.float32))


def test_heads_in_several_blocks(monkeypatch):
    """A small register tile forces the per-token loop over head blocks, the last one partly masked."""
    monkeypatch.setattr(rope_triton, "_TILE", 64)  # head_dim 64: half-dim block 32, so 2 heads per step
    _check_fwd_bwd(*_inputs(2, 5, 3, 5, 64, torch.float32))
    _check_fwd_bwd(*_inputs(1, 5, 3, 5, 80, torch.bfloat16))


def test_cos_sin_broadcast_over_batch():
    """cos/sin [1, T, D] shared by every batch row (the default positions of an unpadded batch)."""
    q_lin, k_lin, q, k, cos, sin = _inputs(2, 4, 2, 5, 80, torch.float32, broadcast_cos=True)
    assert cos.shape[0] == 1
    _check_fwd_bwd(q_lin, k_lin, q, k, cos, sin)


def test_arbitrary_cos_sin_tables():
    """Halves of cos/sin that differ: the backward's swapped, negated sin is still the exact transpose."""
    q_lin, k_lin, q, k, _, _ = _inputs(2, 4, 2, 5, 80, torch.float32)
    g = torch.Generator().manual_seed(5)
    cos, sin = torch.randn(2, 5, 80, generator=g).to(DEVICE), torch.randn(2, 5, 80, generator=g).to(DEVICE)
    _check_fwd_bwd(q_lin, k_lin, q, k, cos, sin)


def test_non_dense_inputs_and_expanded_grads():
    """q, k sliced out of one fused qkv projection (not dense: outputs get their own layout), and the
    stride-0 gradient ``.sum().backward()`` hands to backward."""
    b, t, hq, hk, d = 2, 5, 4, 2, 64
    qkv = torch.randn(b, t, (hq + 2 * hk) * d, generator=torch.Generator().manual_seed(3))
    qkv = qkv.to(DEVICE).requires_grad_()
    q = qkv[..., : hq * d].view(b, t, hq, d).transpose(1, 2)
    k = qkv[..., hq * d : (hq + hk) * d].view(b, t, hk, d).transpose(1, 2)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    cos, sin = rope_cos_sin(inv_freq, torch.tensor(POSITIONS[t], device=DEVICE), torch.float32)
    qo, ko = RoPEFunction.apply(q, k, cos, sin)
    (qo.sum() + 2 * ko.sum()).backward()
    got = qkv.grad.clone()
    qkv.grad = None
    rq, rk = apply_rope_reference(q, k, cos, sin)
    (rq.sum() + 2 * rk.sum()).backward()
    torch.testing.assert_close(qo, rq, **FP32_TOL)
    torch.testing.assert_close(ko, rk, **FP32_TOL)
    torch.testing.assert_close(got, qkv.grad, **FP32_TOL)


def test_mixed_dtypes_promote_like_the_reference():
    """bf16 q/k with fp32 cos/sin (autocast-style): fp32 outputs, bf16 input gradients."""
    q_lin, k_lin, q, k, cos, sin = _inputs(2, 4, 2, 5, 64, torch.bfloat16)
    cos, sin = cos.float(), sin.float()
    qo, ko = RoPEFunction.apply(q, k, cos, sin)
    rq, rk = apply_rope_reference(q, k, cos, sin)
    assert qo.dtype == rq.dtype == torch.float32 and ko.dtype == rk.dtype == torch.float32
    torch.testing.assert_close(qo, rq, **FP32_TOL)
    torch.testing.assert_close(ko, rk, **FP32_TOL)
    dq, dk = torch.autograd.grad((qo, ko), (q_lin, k_lin), (torch.ones_like(qo), torch.ones_like(ko)))
    assert dq.dtype == dk.dtype == torch.bfloat16


def test_bad_shapes_are_named():
    q = torch.randn(1, 4, 5, 64, device=DEVICE)
    k = torch.randn(1, 2, 5, 64, device=DEVICE)
    cos = sin = torch.randn(1, 6, 64, device=DEVICE)
    with pytest.raises(ValueError, match=r"cos must be \[1 or 1, 5, 64\]"):
        RoPEFunction.apply(q, k, cos, sin)
    with pytest.raises(ValueError, match="head_dim must be even"):
        RoPEFunction.apply(torch.randn(1, 4, 5, 63, device=DEVICE), torch.randn(1, 2, 5, 63, device=DEVICE),
                           cos, sin)


def test_decoder_with_triton_rope_matches_reference(monkeypatch):
    """The full decoder with every layer's RoPE on the Triton Function: same logits and gradients (fp32)."""
    import pronghorn.models.attention as attention

    _, model = make_pair("llama3_gqa_rope_scaling")  # head_dim 12: half-dim 6, not a power of two
    model.to(DEVICE)
    ids = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(4)).to(DEVICE)
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2], [0, 1, 2, 3, 4, 5, 6]], device=DEVICE)  # row 0 packs two

    def run():
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=ids, position_ids=pos).logits
        logits.square().mean().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    # the reference everywhere first (on a GPU apply_rope would take the kernel), then the RoPE kernel forced
    monkeypatch.setattr(attention, "apply_rope", lambda q, k, cos, sin, policy: apply_rope_reference(q, k, cos, sin))
    ref_logits, ref_grads = run()
    calls = []

    def triton_rope(q, k, cos, sin, policy):
        calls.append(1)
        return RoPEFunction.apply(q, k, cos, sin)

    monkeypatch.setattr(attention, "apply_rope", triton_rope)
    logits, grads = run()
    assert len(calls) == model.config.num_hidden_layers
    scale = ref_logits.abs().max()
    assert ((logits - ref_logits).abs().max() / scale).item() <= 1e-6
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-5, atol=1e-6 * ref_grads[name].abs().max().item())
