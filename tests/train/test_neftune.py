"""NEFTune: noise of TRL's scale on the input embeddings in training mode only, via a hook (decoder unchanged)."""

from __future__ import annotations

import math

import pytest
import torch

from pronghorn.train.neftune import activate_neftune, deactivate_neftune, neftune
from tests.helpers import make_pair


@pytest.fixture(scope="module")
def model():
    _, ours = make_pair("llama2", torch.float32)
    return ours


def _embeds(model, ids):
    captured = {}
    emb = model.get_input_embeddings()
    handle = emb.register_forward_hook(lambda m, a, out: captured.setdefault("x", out.detach().clone()))
    try:
        model(ids)
    finally:
        handle.remove()
    return captured["x"]


def test_noise_scale_in_training_only(model):
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    plain = model.get_input_embeddings()(ids).detach()
    alpha = 5.0
    activate_neftune(model, alpha)
    try:
        model.train()
        torch.manual_seed(1)
        noisy = _embeds(model, ids)
        torch.manual_seed(1)  # TRL's formula, drawn the same way: uniform(-1, 1) * alpha / sqrt(L * d)
        bound = alpha / math.sqrt(ids.shape[1] * model.config.hidden_size)
        expected = plain + torch.zeros_like(plain).uniform_(-bound, bound)
        torch.testing.assert_close(noisy, expected, rtol=0, atol=0)
        noise = noisy - plain
        assert noise.abs().max() <= bound * (1 + 1e-6) and noise.abs().max() > 0.9 * bound
        assert abs(noise.std().item() - bound / math.sqrt(3)) < 0.1 * bound  # uniform: std = bound / sqrt(3)
        model.eval()  # evaluation and generation see the plain embeddings
        torch.testing.assert_close(_embeds(model, ids), plain, rtol=0, atol=0)
        logits = model(ids).logits
    finally:
        deactivate_neftune(model)
    model.train()
    torch.testing.assert_close(_embeds(model, ids), plain, rtol=0, atol=0)  # hook removed
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids).logits, logits, rtol=0, atol=0)


def test_context_manager_and_bad_alpha(model):
    ids = torch.tensor([[1, 2, 3]])
    plain = model.get_input_embeddings()(ids).detach()
    model.train()
    with neftune(model, 10.0):
        assert not torch.equal(_embeds(model, ids), plain)
    assert torch.equal(_embeds(model, ids), plain)
    with neftune(model, None):
        assert torch.equal(_embeds(model, ids), plain)
    with pytest.raises(ValueError, match="positive"):
        activate_neftune(model, -1)
