"""The optimizer's state parked on the host during GRPO's generation (pronghorn/train/optimizer_parking.py): the
device memory is freed, the values come back bit for bit, and training goes on exactly as without parking."""

from __future__ import annotations

import pytest
import torch

from pronghorn.train.optimizer_parking import StateParking, parkable

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="parks CUDA state")


def _steps(opt, params, n, parking=None):
    for i in range(n):
        for p in params:
            p.grad = torch.full_like(p, 0.01 * (i + 1)) + p.detach() * 0.1
        opt.step()
        opt.zero_grad(set_to_none=True)
        if parking is not None:
            parking.park()
            parking.restore()


def test_state_on_the_cpu_is_not_moved():
    p = torch.nn.Parameter(torch.randn(4, 3))
    opt = torch.optim.AdamW([p], lr=0.1)
    _steps(opt, [p], 1)
    parking = StateParking(opt)
    assert parkable(opt) and parking.device_bytes() == 0
    before = {k: v for k, v in opt.state[p].items()}
    assert parking.park() == 0 and not parking.parked
    assert all(opt.state[p][k] is v for k, v in before.items())


def test_paged_optimizers_are_not_parked():
    class PagedAdamW8bit(torch.optim.AdamW):  # bitsandbytes' paged state lives in memory it pages itself
        pass

    assert not parkable(PagedAdamW8bit([torch.nn.Parameter(torch.zeros(2))]))


@cuda
@pytest.mark.parametrize("kind", ["foreach", "fused"])
def test_parked_state_frees_the_device_and_training_continues_bit_for_bit(kind):
    torch.manual_seed(0)
    init = [torch.randn(256, 64, device="cuda"), torch.randn(64, device="cuda")]
    runs = []
    for park in (False, True):
        params = [torch.nn.Parameter(t.clone()) for t in init]
        opt = torch.optim.AdamW(params, lr=1e-2, **{kind: True})
        parking = StateParking(opt)
        _steps(opt, params, 3, parking if park else None)
        if park:
            state = parking.device_bytes()
            assert state >= 2 * sum(p.numel() * 4 for p in params)  # both moments at least
            moments = [opt.state[p]["exp_avg"].clone() for p in params]
            before = torch.cuda.memory_allocated()
            assert parking.park() == state and parking.parked
            assert before - torch.cuda.memory_allocated() >= state  # blocks are rounded up to 512 bytes
            assert all(opt.state[p]["exp_avg"].device.type == "cpu" for p in params)
            parking.restore()
            assert all(torch.equal(opt.state[p]["exp_avg"], m) for p, m in zip(params, moments))
        runs.append([p.detach().clone() for p in params])
    assert all(torch.equal(a, b) for a, b in zip(*runs))
