"""The loss's valid-row count started early (kernels/valid_rows.py): the same loss and gradients, bit for bit,
as the count taken at the loss; refused for other labels; started by the model before its first layer."""

from __future__ import annotations

import pytest
import torch

from pronghorn.kernels import IGNORE_INDEX, linear_cross_entropy
from pronghorn.kernels.valid_rows import ValidRows

pytest.importorskip("triton")
from pronghorn.kernels.linear_cross_entropy_triton import linear_cross_entropy_triton  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU runs the kernel under Triton's interpreter


def _labels(n=29, vocab=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[torch.randperm(n, generator=g)[: n // 3]] = IGNORE_INDEX
    labels[0] = IGNORE_INDEX
    return labels.to(DEV)


def test_count_and_order_are_the_valid_rows_first_in_their_order():
    labels = _labels()
    rows = ValidRows(labels)
    valid = (labels != IGNORE_INDEX).nonzero().squeeze(-1)
    assert rows.count() == valid.numel()
    assert torch.equal(rows.order[: valid.numel()], valid)
    assert torch.equal(rows.order[valid.numel():], (labels == IGNORE_INDEX).nonzero().squeeze(-1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_started_early_gives_the_same_loss_and_gradients_bit_for_bit(dtype):
    labels = _labels()
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(labels.numel(), 16, generator=g).to(DEV, dtype)
    weight = (torch.randn(50, 16, generator=g) * 0.4).to(DEV, dtype)
    out = []
    for early in (False, True):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        rows = ValidRows(labels) if early else None
        loss = linear_cross_entropy_triton(h, w, labels, valid_rows=rows)
        loss.backward()
        out.append((loss.detach(), h.grad, w.grad))
    for a, b in zip(*out):
        assert torch.equal(a, b)


def test_rows_counted_for_other_labels_are_refused():
    labels = _labels()
    other = labels.clone()
    hidden = torch.randn(labels.numel(), 16, device=DEV)
    weight = torch.randn(50, 16, device=DEV)
    with pytest.raises(ValueError, match="other labels"):
        linear_cross_entropy_triton(hidden, weight, other, valid_rows=ValidRows(labels))
    with pytest.raises(ValueError, match="other labels"):
        linear_cross_entropy_triton(hidden, weight, labels, ignore_index=-1, valid_rows=ValidRows(labels))


def test_the_reference_path_ignores_them():
    labels = _labels().cpu()
    hidden, weight = torch.randn(labels.numel(), 16), torch.randn(50, 16)
    loss = linear_cross_entropy(hidden, weight, labels, valid_rows=ValidRows(labels))
    assert torch.equal(loss, linear_cross_entropy(hidden, weight, labels))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the model starts the count only for CUDA labels")
def test_the_model_starts_the_count_before_its_first_layer(monkeypatch):
    from helpers import moving_padding_batch, tiny_lora_model
    from pronghorn.kernels.policy import KernelPolicy
    from pronghorn.models import decoder

    events = []

    class Recording(ValidRows):
        def __init__(self, *a, **kw):
            events.append("count started")
            super().__init__(*a, **kw)

        def count(self):
            events.append("count read")
            return super().count()

    monkeypatch.setattr(decoder, "ValidRows", Recording)
    model = tiny_lora_model().cuda().train()
    model.model.layers[0].register_forward_pre_hook(lambda *_: events.append("layer 0"))
    model(**moving_padding_batch(0, "cuda")).loss.backward()
    assert events == ["count started", "layer 0", "count read"]
    events.clear()
    model.set_kernel_policy(KernelPolicy(reference=True))  # the reference loss counts for itself
    model(**moving_padding_batch(0, "cuda")).loss.backward()
    assert events == ["layer 0"]


def test_the_count_is_started_only_for_the_fused_path():
    """The model asks ``fused_loss_path`` before its layers: a reference policy, a CPU and a head on another
    device (a tied table kept on the host, which the loss streams) take other paths, which read no count."""
    from pronghorn.kernels.linear_cross_entropy import fused_loss_path
    from pronghorn.kernels.policy import KernelPolicy

    labels, weight = _labels(), torch.randn(50, 16, device=DEV)
    assert not fused_loss_path(weight.cpu(), labels.cpu(), torch.device("cpu"))
    assert not fused_loss_path(weight, labels, weight.device, KernelPolicy(reference=True))
    if torch.cuda.is_available():
        assert fused_loss_path(weight, labels, weight.device)
        assert not fused_loss_path(weight.cpu(), labels, weight.device)  # the streamed head
