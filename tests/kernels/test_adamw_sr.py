"""The AdamW step with stochastic rounding (kernels/adamw_sr.py): the Triton kernel (run by Triton's interpreter
on the CPU) equals the PyTorch reference bit for bit, in the weight, both moments and the rounding; the
reference's fp32 math is torch.optim.AdamW's up to rounding, and its noise is uniform over the 16 bits."""

import pytest
import torch

from pronghorn.kernels.adamw_sr import (adamw_sr_constants, adamw_sr_step_reference, rounding_noise,
                                        stochastic_round_bf16)

CONSTANTS = adamw_sr_constants(lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-6, weight_decay=0.1, step=3)


def _state(shape, seed=0, moments=torch.float32):
    g = torch.Generator().manual_seed(seed)
    weight = (torch.randn(shape, generator=g) * 0.05).to(torch.bfloat16)
    grad = torch.randn(shape, generator=g).to(torch.bfloat16)
    exp_avg = (torch.randn(shape, generator=g) * 0.1).to(moments)
    exp_avg_sq = (torch.rand(shape, generator=g) * 0.01).to(moments)
    return [weight, grad, exp_avg, exp_avg_sq]


@pytest.mark.parametrize("moments", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(7,), (33, 65), (3, 1024 + 5)])
def test_triton_kernel_equals_reference(shape, moments):
    from pronghorn.kernels.adamw_sr_triton import adamw_sr_step_triton

    ref, got = _state(shape, moments=moments), _state(shape, moments=moments)
    got = [t.cuda() for t in got] if torch.cuda.is_available() else got  # compiled there, interpreted here
    ref[0].view(-1)[0] = float("nan")  # a NaN weight stays NaN in both
    got[0].view(-1)[0] = float("nan")
    adamw_sr_step_reference(*ref, 12345, CONSTANTS)
    adamw_sr_step_triton(*got, 12345, CONSTANTS)
    assert ref[0].view(-1)[0].isnan() and got[0].view(-1)[0].isnan()  # a NaN's payload bits are not compared
    ref[0].view(-1)[0] = got[0].view(-1)[0] = 0.0
    for name, a, b in zip(("weight", "grad", "exp_avg", "exp_avg_sq"), ref, got):
        assert torch.equal(a.view(torch.int16 if a.dtype == torch.bfloat16 else torch.int32),
                           b.cpu().view(torch.int16 if b.dtype == torch.bfloat16 else torch.int32)), name


def test_reference_math_is_adamw():
    """The fp32 weight before rounding is torch.optim.AdamW's (single-tensor) result within fp32 rounding: the
    weight lands on one of the two bf16 neighbours of AdamW's fp32 result; each moment differs by at most two
    roundings (2**-22) of the magnitudes it is made of (torch's lerp and addcmul order the operations otherwise)."""
    weight, grad, exp_avg, exp_avg_sq = _state((64, 48))
    m_size, v_size = exp_avg.abs() + grad.float().abs(), exp_avg_sq + grad.float() ** 2
    p = torch.nn.Parameter(weight.float())
    opt = torch.optim.AdamW([p], lr=1e-3, betas=(0.9, 0.95), eps=1e-6, weight_decay=0.1, foreach=False)
    opt.state[p] = {"step": torch.tensor(2.0), "exp_avg": exp_avg.clone(), "exp_avg_sq": exp_avg_sq.clone()}
    p.grad = grad.float()
    opt.step()
    adamw_sr_step_reference(weight, grad, exp_avg, exp_avg_sq, 7, CONSTANTS)
    assert ((exp_avg - opt.state[p]["exp_avg"]).abs() <= 2.0 ** -22 * m_size).all()
    assert ((exp_avg_sq - opt.state[p]["exp_avg_sq"]).abs() <= 2.0 ** -22 * v_size).all()
    exact = p.detach()
    down = exact.to(torch.bfloat16).float()
    spacing = torch.where(exact.abs() > 0, 2.0 ** (torch.floor(torch.log2(exact.abs())) - 7), torch.zeros(()))
    below = torch.where(down > exact, down - spacing, down)
    w = weight.float()
    assert bool(((w == below) | (w == below + spacing) | (w == down)).all())


def test_noise_is_uniform_over_16_bits():
    """65,536 draws: each of 16 buckets of 4,096 values holds 4,096 draws give or take 5 standard deviations
    (sqrt(4096 * 15/16) = 62); the low bit is set half the time within the same bound."""
    noise = rounding_noise(65_536, 99, "cpu")
    assert int(noise.min()) >= 0 and int(noise.max()) < 65_536
    counts = torch.bincount(noise // 4096, minlength=16)
    assert (counts - 4096).abs().max() < 5 * 62
    assert abs(int((noise & 1).sum()) - 32_768) < 5 * 128


def test_rounding_key_changes_the_draws_not_the_values():
    x = torch.randn(4096)
    a, b = stochastic_round_bf16(x, 1), stochastic_round_bf16(x, 2)
    assert not torch.equal(a, b)
    assert ((a.float() - b.float()).abs() <= (x.abs() * 2.0 ** -7) + 1e-30).all()  # at most one spacing apart


def test_bf16_moments_are_the_fp32_moments_stochastically_rounded():
    """With bf16 moments the step's math is the fp32 step's on the same (bf16-valued) inputs: the weight equals
    the fp32-moment step's bit for bit, and each moment is one of the two bf16 neighbours of its fp32 value, drawn
    from its own stream (the two moments and the weight do not share draws)."""
    from pronghorn.kernels.adamw_sr import moment_keys

    lean = _state((64, 48), moments=torch.bfloat16)
    wide = [t.clone() for t in lean[:2]] + [t.float() for t in lean[2:]]
    adamw_sr_step_reference(*lean, 11, CONSTANTS)
    adamw_sr_step_reference(*wide, 11, CONSTANTS)
    assert lean[2].dtype == lean[3].dtype == torch.bfloat16
    assert torch.equal(lean[0].view(torch.int16), wide[0].view(torch.int16))
    for got, exact, key in zip(lean[2:], wide[2:], moment_keys(11)):
        assert torch.equal(got, stochastic_round_bf16(exact, key))
    assert len({11, *moment_keys(11)}) == 3


def test_mixed_moment_dtypes_are_refused():
    from pronghorn.kernels.adamw_sr import adamw_sr_step

    weight, grad, m, v = _state((8,))
    with pytest.raises(TypeError, match="both fp32 or both bf16"):
        adamw_sr_step(weight, grad, m.to(torch.bfloat16), v, 1, CONSTANTS)
