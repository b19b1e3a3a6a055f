"""streamed_logprobs (vocabulary-outer, head weight possibly on the host) against the full-logits reference.

fp32: values within 2e-5 absolute, d hidden within 1e-6 + 1e-4 relative (the tolerances of the chunked head,
tests/kernels/test_linear_logprobs.py); bf16: the same 2e-2 bounds as the chunked head's bf16 test. On a GPU the
weight sits in pinned host memory, as with ``offload_embedding="tied"``."""

from __future__ import annotations

import pytest
import torch

from pronghorn.kernels import IGNORE_INDEX
from pronghorn.kernels.linear_logprobs import linear_logprobs_reference
from pronghorn.kernels.streamed_logprobs import streamed_logprobs
from kernel_cases import DEV, logprob_inputs as _inputs, run_logprobs as _run


def _host(weight):
    return weight.cpu().pin_memory() if weight.is_cuda else weight


@pytest.mark.parametrize("V,H,chunk,tile,softcap", [(97, 16, 8192, 2048, None), (251, 24, 16, 5, None),
                                                    (64, 8, 64, 1, None), (251, 24, 16, 5, 2.0)])
def test_values_and_grads_match_reference_fp32(V, H, chunk, tile, softcap):
    """``softcap``: Gemma 2's final logit cap, as in the chunked head's test."""
    hidden, weight, labels, upstream = _inputs(V, H)
    ref = _run(linear_logprobs_reference, hidden, weight, labels, upstream, False, softcap=softcap)
    got = _run(lambda h, w, y: streamed_logprobs(h, _host(w), y, vocab_chunk=chunk, row_tile=tile, softcap=softcap),
               hidden, weight, labels, upstream, False)
    assert torch.allclose(got[0], ref[0], atol=2e-5, rtol=0)
    assert (got[0][labels == IGNORE_INDEX] == 0).all() and (got[1][labels == IGNORE_INDEX] == 0).all()
    assert torch.allclose(got[1], ref[1], atol=1e-6, rtol=1e-4)


def test_no_grad_float64_oracle_and_all_ignored():
    hidden, weight, labels, upstream = _inputs(131, 8, seed=3)
    with torch.no_grad():
        got = streamed_logprobs(hidden, _host(weight), labels, vocab_chunk=7, row_tile=4)
    oracle = linear_logprobs_reference(hidden.double(), weight.double(), labels).float()
    assert torch.allclose(got, oracle, atol=2e-5, rtol=0)
    labels[:] = IGNORE_INDEX
    out, dh, _ = _run(streamed_logprobs, hidden, weight, labels, upstream, False)
    assert (out == 0).all() and (dh == 0).all()


def test_trainable_head_is_refused():
    hidden, weight, labels, _ = _inputs(97, 16)
    with pytest.raises(ValueError, match="frozen head"):
        streamed_logprobs(hidden, weight.requires_grad_(), labels)


def test_bf16_close_to_reference():
    x = _inputs(97, 16, dtype=torch.bfloat16)
    ref = _run(linear_logprobs_reference, *x, False)
    got = _run(lambda h, w, y: streamed_logprobs(h, _host(w), y, vocab_chunk=10, row_tile=6), *x, False)
    assert torch.allclose(got[0], ref[0], atol=2e-2, rtol=0)
    err = (got[1].float() - ref[1].float()).norm() / ref[1].float().norm()
    assert err < 2e-2


@pytest.mark.skipif(DEV != "cuda", reason="needs CUDA")
def test_host_weight_on_gpu_equals_device_weight_bitwise():
    """The copies only move the slices: a pinned host weight gives bitwise the device weight's result."""
    hidden, weight, labels, upstream = _inputs(4099, 32, dtype=torch.bfloat16)
    dev = _run(lambda h, w, y: streamed_logprobs(h, w, y, vocab_chunk=512), hidden, weight, labels, upstream, False)
    host = _run(lambda h, w, y: streamed_logprobs(h, _host(w), y, vocab_chunk=512), hidden, weight, labels,
                upstream, False)
    assert torch.equal(dev[0], host[0]) and torch.equal(dev[1], host[1])


@pytest.mark.parametrize("chunk,tile,softcap", [(16, 5, None), (7, 64, 2.0)])
def test_entropy_matches_full_logits(chunk, tile, softcap):
    """``entropy=True``: the running softmax-weighted logit sum gives each row's entropy over several vocabulary
    slices (fp32: 1e-5), 0 at ignored rows, no gradient; the log-probs are those of ``entropy=False``."""
    hidden, weight, labels, _ = _inputs(251, 24)
    _, want = linear_logprobs_reference(hidden, weight, labels, softcap=softcap, entropy=True)
    logp, ent = streamed_logprobs(hidden.requires_grad_(), _host(weight), labels, vocab_chunk=chunk, row_tile=tile,
                                  softcap=softcap, entropy=True)
    assert not ent.requires_grad and logp.requires_grad
    torch.testing.assert_close(ent, want, atol=1e-5, rtol=0)
    assert (ent[labels == IGNORE_INDEX] == 0).all()
    plain = streamed_logprobs(hidden, _host(weight), labels, vocab_chunk=chunk, row_tile=tile, softcap=softcap)
    assert torch.equal(logp, plain)
