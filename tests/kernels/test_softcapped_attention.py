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
