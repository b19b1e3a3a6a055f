"""Chunked per-token log-probs of labels (linear_logprobs) vs full logits + log_softmax + gather.

fp32, tolerances: values atol 2e-5 (log-probs of magnitude ~10, fp32 log-sum-exp in a different summation
order), gradients atol 1e-6 + rtol 1e-4 (the same fp32 products, summed in another order). Both row paths
are tested: torch ops, and the fused head's Triton CE row kernel (through the interpreter on the CPU).
Odd vocab sizes, ignored rows (including the first), several chunks, arbitrary upstream gradients, frozen and
trainable heads, soft-capped logits (Gemma 2).
"""

from __future__ import annotations

import pytest
import torch

from pronghorn.kernels import IGNORE_INDEX
from pronghorn.kernels.linear_logprobs import linear_logprobs, linear_logprobs_reference

from kernel_cases import logprob_inputs as _inputs, run_logprobs as _run


@pytest.mark.parametrize("triton_rows", [False, True])
@pytest.mark.parametrize("train_weight", [False, True])
@pytest.mark.parametrize("V,H,chunk,softcap", [(97, 16, None, None), (251, 24, 4, None), (97, 16, 5, 2.0)])
def test_values_and_grads_match_reference_fp32(V, H, chunk, softcap, train_weight, triton_rows):
    """``softcap``: Gemma 2's final logit cap c * tanh(x / c), at a size (2 against logits of about +-6) that
    changes every row's distribution; the reference caps its full fp32 logits."""
    if triton_rows:
        pytest.importorskip("triton")
    x = _inputs(V, H)
    ref = _run(linear_logprobs_reference, *x, train_weight, softcap=softcap)
    got = _run(linear_logprobs, *x, train_weight, chunk_size=chunk, triton_rows=triton_rows, softcap=softcap)
    assert torch.allclose(got[0], ref[0], atol=2e-5, rtol=0)
    assert (got[0][x[2] == IGNORE_INDEX] == 0).all()
    assert torch.allclose(got[1], ref[1], atol=1e-6, rtol=1e-4)
    if train_weight:
        assert torch.allclose(got[2], ref[2], atol=1e-6, rtol=1e-4)
    else:
        assert got[2] is None


def test_no_grad_forward_and_float64_oracle():
    hidden, weight, labels, _ = _inputs(131, 8, seed=3)
    with torch.no_grad():
        got = linear_logprobs(hidden, weight, labels, chunk_size=3)
    oracle = linear_logprobs_reference(hidden.double(), weight.double(), labels).float()
    assert torch.allclose(got, oracle, atol=2e-5, rtol=0)


def test_all_rows_ignored_gives_zeros_and_zero_grads():
    hidden, weight, labels, upstream = _inputs(97, 16)
    labels[:] = IGNORE_INDEX
    out, dh, dw = _run(linear_logprobs, hidden, weight, labels, upstream, True)
    assert (out == 0).all() and (dh == 0).all() and (dw == 0).all()


def test_bf16_close_to_reference():
    """bf16 inputs: logits rounded to bf16 in both (matmul in the input dtype), fp32 log-sum-exp in both;
    values within 2e-2 absolute (bf16 logits of magnitude ~5), d hidden within 2e-2 relative Frobenius."""
    x = _inputs(97, 16, dtype=torch.bfloat16)
    ref = _run(linear_logprobs_reference, *x, False)
    got = _run(linear_logprobs, *x, False, chunk_size=5)
    assert torch.allclose(got[0], ref[0], atol=2e-2, rtol=0)
    err = (got[1].float() - ref[1].float()).norm() / ref[1].float().norm()
    assert err < 2e-2


def test_keep_rows_from_the_caller_give_the_same_values_and_grads():
    """``keep_rows`` (the labelled rows, known to the caller: no nonzero, no host sync) changes nothing; wrong
    ones are refused (checked on the device, asynchronously; tested on the CPU, where the check raises at once)."""
    x = _inputs(97, 16)
    rows = (x[2] != IGNORE_INDEX).nonzero().squeeze(-1)
    for train_weight in (False, True):
        ref = _run(linear_logprobs, *x, train_weight, chunk_size=4)
        got = _run(linear_logprobs, *x, train_weight, chunk_size=4, keep_rows=rows)
        assert all(a is None and b is None or torch.equal(a, b) for a, b in zip(got, ref))
    h, w, y = (t.cpu() for t in x[:3])  # on a GPU the check is a device-side assert, which ends the process
    with pytest.raises(RuntimeError, match="keep_rows"):
        linear_logprobs(h, w, y, keep_rows=rows[1:].cpu())
    with pytest.raises(RuntimeError, match="keep_rows"):
        linear_logprobs(h, w, y, keep_rows=torch.arange(rows.numel()))


def test_softcap_changes_the_result_and_float64_oracle():
    """The cap is applied (the capped and uncapped log-probs differ by far more than the tolerance), and the
    capped values and d hidden agree with a float64 oracle of the same function."""
    hidden, weight, labels, upstream = _inputs(131, 8, seed=5)
    plain = _run(linear_logprobs, hidden, weight, labels, upstream, False, chunk_size=3)
    got = _run(linear_logprobs, hidden, weight, labels, upstream, False, chunk_size=3, softcap=1.5)
    assert (got[0] - plain[0]).abs().max() > 0.1
    oracle = _run(linear_logprobs_reference, hidden.double(), weight.double(), labels, upstream.double(), False,
                  softcap=1.5)
    assert torch.allclose(got[0].double(), oracle[0], atol=2e-5, rtol=0)
    assert torch.allclose(got[1].double(), oracle[1], atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("triton_rows", [False, True])
@pytest.mark.parametrize("V,H,chunk,softcap", [(97, 16, None, None), (251, 24, 4, None), (97, 16, 5, 2.0)])
def test_entropy_matches_full_logits(V, H, chunk, softcap, triton_rows):
    """``entropy=True``: each kept row's entropy of the (capped) distribution, from the chunks the log-probs use,
    equals ``-sum p log p`` of the full logits (fp32: 1e-5, lse and the mean logit of magnitude ~10); 0 at ignored
    rows; the log-probs and their gradient are those of ``entropy=False`` exactly, and the entropy has no grad."""
    if triton_rows:
        pytest.importorskip("triton")
    hidden, weight, labels, upstream = _inputs(V, H)
    want_logp, want = linear_logprobs_reference(hidden, weight, labels, softcap=softcap, entropy=True)
    plain = _run(linear_logprobs, hidden, weight, labels, upstream, False, chunk_size=chunk, triton_rows=triton_rows,
                 softcap=softcap)
    h = hidden.clone().requires_grad_()
    logp, ent = linear_logprobs(h, weight, labels, chunk_size=chunk, triton_rows=triton_rows, softcap=softcap,
                                entropy=True)
    assert not ent.requires_grad and ent.dtype == torch.float32
    torch.testing.assert_close(ent, want, atol=1e-5, rtol=0)
    assert (ent[labels == IGNORE_INDEX] == 0).all() and (ent[labels != IGNORE_INDEX] > 0).all()
    (logp * upstream).sum().backward()
    assert torch.equal(logp.detach(), plain[0]) and torch.equal(h.grad, plain[1])


def test_entropy_float64_without_grad():
    hidden, weight, labels, _ = _inputs(131, 8, seed=3)
    hidden, weight = hidden.double(), weight.double()
    with torch.no_grad():
        logp, ent = linear_logprobs(hidden, weight, labels, chunk_size=3, entropy=True)
    want_logp, want = linear_logprobs_reference(hidden, weight, labels, entropy=True)
    assert ent.dtype == torch.float64
    torch.testing.assert_close(ent, want, atol=1e-12, rtol=0)
    torch.testing.assert_close(logp, want_logp, atol=1e-12, rtol=0)
