"""NF4 storage (bitsandbytes layout): quantization error bound, the Triton dequant kernel against the PyTorch
reference (bit for bit), state-dict round trips, and agreement with bitsandbytes itself when installed."""

import pytest
import torch

from pronghorn.kernels.nf4 import NF4_CODE, NF4Weight, dequantize_nf4_reference, dynamic_map, quantize_nf4
from pronghorn.models.linear import Linear

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Odd sizes: a short last NF4 block, an odd value count (half-used last byte), > 256 blocks (two nested blocks).
SHAPES = [(64, 256), (33, 101), (7, 9), (130, 257)]


def _weight(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 0.05).to(dtype).to(DEVICE)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("double_quant", [True, False])
def test_round_trip_error_within_half_an_nf4_step(shape, double_quant):
    x = _weight(shape, torch.float32)
    w = quantize_nf4(x, compress_statistics=double_quant)
    assert w.shape == torch.Size(shape) and w.dtype == torch.float32 and w.device.type == DEVICE
    assert w.packed.numel() == (x.numel() + 1) // 2
    y = w.dequantize()
    # Each value lands on the NF4 level nearest to x / absmax: the error is at most half the widest gap between
    # levels (0.1386, between 0.7230 and 1.0) times the block's absmax, plus the absmax's own double-quant error.
    n = x.numel()
    absmax = x.reshape(-1).abs()
    absmax = torch.nn.functional.pad(absmax, (0, -n % 64)).view(-1, 64).amax(1).repeat_interleave(64)[:n]
    half_gap = max(b - a for a, b in zip(NF4_CODE, NF4_CODE[1:])) / 2
    stats_err = (w.block_absmax().repeat_interleave(64)[:n] - absmax).abs()
    bound = half_gap * absmax + stats_err + 1e-7
    assert ((y - x).reshape(-1).abs() <= bound).all()
    if double_quant:  # the 8-bit dynamic map keeps absmax within ~1% (256 values per nested block)
        assert (stats_err <= 0.01 * absmax.max()).all()
    else:
        assert stats_err.max() == 0


def test_levels_are_exact_and_zero_blocks_stay_zero():
    x = torch.zeros(3, 64, device=DEVICE)
    x[0] = torch.tensor(NF4_CODE, device=DEVICE).repeat(4) * 2.0
    w = quantize_nf4(x)
    assert torch.equal(dequantize_nf4_reference(w, torch.float32)[1:], x[1:])
    w = quantize_nf4(x, compress_statistics=False)
    assert torch.equal(w.dequantize(), x)  # values on the grid, fp32 absmax: exact


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("double_quant", [True, False])
def test_triton_kernel_equals_reference(shape, out_dtype, double_quant):
    from pronghorn.kernels.nf4_triton import dequantize_nf4_triton

    w = quantize_nf4(_weight(shape, torch.bfloat16, seed=1), compress_statistics=double_quant)
    got = dequantize_nf4_triton(w, out_dtype)
    assert got.dtype == out_dtype and got.shape == torch.Size(shape)
    assert torch.equal(got, dequantize_nf4_reference(w, out_dtype))


@pytest.mark.parametrize("blocksize,values_per_program,num_warps", [(64, 64, 1), (64, 256, 2), (128, 4096, 4),
                                                                   (256, 512, 8), (96, 4096, 4)])
def test_triton_kernel_tiles_and_blocksizes(blocksize, values_per_program, num_warps):
    """One block per program up to many; blocksizes other than 64 (96 is not a power of two: the reference)."""
    from pronghorn.kernels.nf4_triton import dequantize_nf4_triton

    w = quantize_nf4(_weight((130, 257), torch.bfloat16, seed=2), blocksize=blocksize)
    got = dequantize_nf4_triton(w, torch.float32, values_per_program=values_per_program, num_warps=num_warps)
    assert torch.equal(got, dequantize_nf4_reference(w, torch.float32))


def test_dequantize_dispatches_by_device():
    w = quantize_nf4(_weight((16, 64), torch.bfloat16))
    assert w.dequantize().dtype == torch.bfloat16
    assert torch.equal(w.dequantize(torch.float32), dequantize_nf4_reference(w, torch.float32))


def test_state_dict_uses_bitsandbytes_names_and_round_trips():
    lin = Linear(101, 33, dtype=torch.bfloat16, device=DEVICE)
    lin.weight.data.copy_(_weight((33, 101), torch.bfloat16))
    lin.quantize_nf4()
    w = lin.weight
    sd = lin.state_dict()
    assert sorted(sd) == sorted(["weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax",
                                 "weight.nested_quant_map", "weight.quant_state.bitsandbytes__nf4"])
    assert sd["weight"].dtype == torch.uint8 and sd["weight"].shape == ((33 * 101 + 1) // 2, 1)
    assert sd["weight.nested_absmax"].dtype == torch.float32
    other = Linear(101, 33, dtype=torch.bfloat16, device=DEVICE)
    other.quantize_nf4()
    other.load_state_dict(sd)
    assert torch.equal(other.weight.dequantize(), w.dequantize())
    assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), sd.values()))


def test_model_dtype_casts_leave_the_stored_bits_alone():
    w = quantize_nf4(_weight((16, 64), torch.bfloat16))
    before = w.dequantize(torch.float32)
    m = torch.nn.Module()
    m.weight = w
    m.to(torch.float16)
    assert torch.equal(w.dequantize(torch.float32), before) and w.nested_absmax.dtype == torch.int32


# --- bitsandbytes itself (skipped when it is not installed) --------------------------------------------------


@pytest.mark.parametrize("shape,dtype", [((64, 256), torch.bfloat16), ((33, 100), torch.float32),
                                         ((130, 257), torch.float16)], ids=str)
def test_bitsandbytes_reads_ours_and_we_read_theirs(shape, dtype):
    pytest.importorskip("bitsandbytes")
    with torch._dynamo.config.patch(disable=True):  # bnb's CPU dequantize torch.compiles: slow, same math
        _check_against_bitsandbytes(shape, dtype)


def _check_against_bitsandbytes(shape, dtype):
    import bitsandbytes.functional as F

    x = _weight(shape, dtype, seed=2).cpu()
    packed, state = F.quantize_4bit(x, blocksize=64, compress_statistics=True, quant_type="nf4")
    ours = quantize_nf4(x).to("cpu")
    theirs = state.as_dict(packed=True)
    mine = ours.bnb_tensors()
    assert torch.equal(packed, mine[""])  # same nibbles, same order
    for key in ("quant_map", "nested_absmax", "nested_quant_map", "quant_state.bitsandbytes__nf4"):
        assert torch.equal(theirs[key], mine[key]), key
    # Nested absmax indices: ours is the nearest entry of the dynamic map; bitsandbytes' CPU library searches
    # approximately and may pick the neighbour on near-ties. Both decode identically in either library:
    assert torch.equal(dynamic_map(), F.create_dynamic_map())
    diff = (theirs["absmax"].int() - mine["absmax"].int()).abs()
    assert diff.max() <= 1 and diff.float().mean() < 0.02
    their_w = NF4Weight.from_bnb_tensors({"": packed, **theirs}).to("cpu")
    assert torch.equal(their_w.dequantize(), F.dequantize_4bit(packed, state))
    qs = F.QuantState.from_dict({k: v for k, v in mine.items() if k}, device=torch.device("cpu"))
    assert torch.equal(F.dequantize_4bit(mine[""], qs), ours.dequantize())


def test_dequantized_once_gives_one_tensor_per_weight_and_dtype():
    from pronghorn.kernels.nf4 import dequantized_once

    q = quantize_nf4(torch.randn(8, 64, generator=torch.Generator().manual_seed(0)))
    other = quantize_nf4(torch.randn(8, 64, generator=torch.Generator().manual_seed(1)))
    assert q.dequantize() is not q.dequantize()
    with dequantized_once([q, torch.ones(2)]):  # the NF4 weights among them
        first = q.dequantize()
        assert q.dequantize() is first and q.dequantize(torch.float32) is first
        assert q.dequantize(torch.bfloat16) is not first
        assert other.dequantize() is not other.dequantize()  # only the weights named
    assert q.reuse is None and q.dequantize() is not first
    assert torch.equal(q.dequantize(), first)
