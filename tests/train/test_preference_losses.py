"""Preference losses vs the formulas written out element by element (Python floats, float64), and vs TRL's own
loss code on the same tensors when trl is installed (values and gradients equal to fp32 tolerance).

TRL 1.x has no standalone loss functions: the DPO/KTO losses live inside ``DPOTrainer._compute_loss`` /
``KTOTrainer._compute_loss``, which are called here unbound with a stand-in ``self`` (the attributes they read)
and a stand-in model that returns the given per-token log-probs, exactly the tensors TRL's fused head
would hand them. ORPO / SimPO are TRL's ``ORPOTrainer.odds_ratio_loss`` / ``CPOTrainer.cpo_loss``.
"""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from pronghorn.train.preference_losses import dpo_loss, kto_kl, kto_loss, orpo_loss, simpo_loss

B = 5


def _logps(seed=0, n=B, scale=20.0):
    g = torch.Generator().manual_seed(seed)
    return [-(torch.rand(n, generator=g, dtype=torch.float64) * scale + 0.5) for _ in range(4)]


def _ls(x):  # log sigmoid
    return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))


def _plain_dpo(pc, pr, rc, rr, beta, loss_type, e, nc, nr):
    d = (pc - rc) - (pr - rr)
    if loss_type == "sigmoid":
        return -(1 - e) * _ls(beta * d) - e * _ls(-beta * d)
    if loss_type == "robust":
        return (-(1 - e) * _ls(beta * d) + e * _ls(-beta * d)) / (1 - 2 * e)
    if loss_type == "hinge":
        return max(0.0, 1 - beta * d)
    if loss_type == "ipo":
        return ((pc - rc) / nc - (pr - rr) / nr - 1 / (2 * beta)) ** 2
    raise AssertionError(loss_type)


@pytest.mark.parametrize("loss_type,e", [("sigmoid", 0.0), ("sigmoid", 0.1), ("robust", 0.2), ("hinge", 0.0),
                                         ("ipo", 0.0)])
def test_dpo_matches_formula(loss_type, e):
    pc, pr, rc, rr = _logps()
    nc, nr = torch.tensor([3, 7, 1, 12, 5]), torch.tensor([4, 2, 9, 1, 6])
    beta = 0.3
    out = dpo_loss(pc, pr, rc, rr, beta, loss_type, e, nc, nr)
    for i in range(B):
        want = _plain_dpo(*(float(t[i]) for t in (pc, pr, rc, rr)), beta, loss_type, e, int(nc[i]), int(nr[i]))
        assert float(out.losses[i]) == pytest.approx(want, rel=1e-12, abs=1e-12)
        assert float(out.chosen_rewards[i]) == pytest.approx(beta * float(pc[i] - rc[i]), rel=1e-12)
        assert float(out.rejected_rewards[i]) == pytest.approx(beta * float(pr[i] - rr[i]), rel=1e-12)


def test_simpo_orpo_kto_match_formulas():
    pc, pr, rc, rr = _logps(1, scale=3.0)  # mean log-probs per token are small
    s = simpo_loss(pc, pr, beta=2.0, simpo_gamma=0.7)
    o, log_odds = orpo_loss(pc, pr, beta=0.2)
    for i in range(B):
        c, r = float(pc[i]), float(pr[i])
        assert float(s.losses[i]) == pytest.approx(-_ls(2.0 * (c - r - 0.7 / 2.0)), rel=1e-12)
        lo = (c - r) - (math.log(1 - math.exp(c)) - math.log(1 - math.exp(r)))
        assert float(log_odds[i]) == pytest.approx(lo, rel=1e-10)
        assert float(o.losses[i]) == pytest.approx(-0.2 * _ls(lo), rel=1e-10)
    kl_p, kl_r = torch.tensor([-3.0, -5.0, -4.0], dtype=torch.float64), torch.tensor([-4.0, -4.5, -4.0],
                                                                                      dtype=torch.float64)
    kl = kto_kl(kl_p, kl_r)
    assert float(kl) == pytest.approx(max(0.0, (1.0 - 0.5 + 0.0) / 3), rel=1e-12)
    k = kto_loss(pc[:2], pr[2:], rc[:2], rr[2:], kl, beta=0.5, desirable_weight=1.3, undesirable_weight=0.7)
    want = [1.3 * (1 - 1 / (1 + math.exp(-0.5 * (float(pc[i] - rc[i]) - float(kl))))) for i in range(2)]
    want += [0.7 * (1 - 1 / (1 + math.exp(-0.5 * (float(kl) - float(pr[i] - rr[i]))))) for i in range(2, B)]
    assert k.losses.tolist() == pytest.approx(want, rel=1e-12)
    assert float(kto_kl(kl_r, kl_p)) == 0.0  # negative estimates clamp at 0


# ---- against TRL's own code ------------------------------------------------------------------------------


def _accelerator():
    return SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x,
                           unwrap_model=lambda m: m)


def _per_token(seed, rows, T, mask):
    g = torch.Generator().manual_seed(seed)
    return (-(torch.rand(rows, T - 1, generator=g) * 3) * mask[:, 1:]).requires_grad_()


class _FusedModel:
    """Stand-in for a model with TRL's fused head: returns the given per-token log-probs."""

    training = True

    def __init__(self, by_input):
        self.by_input = by_input

    def __call__(self, input_ids, labels=None, fused_lm_head=False, **kw):
        lp = self.by_input[id(input_ids)]
        z = torch.zeros_like(lp.detach())
        return SimpleNamespace(log_probs=lp, entropy=z, mean_logits=z, is_top1=z.bool(), aux_loss=None)


def _completion_mask(rows, T, seed):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(rows, T, dtype=torch.long)
    for i in range(rows):
        mask[i, int(torch.randint(2, T - 1, (1,), generator=g)):] = 1
    return mask


@pytest.mark.parametrize("loss_type,e", [("sigmoid", 0.0), ("robust", 0.1), ("hinge", 0.0), ("ipo", 0.0)])
def test_dpo_equals_trl_dpo_trainer_loss(loss_type, e):
    trl = pytest.importorskip("trl")
    T, beta = 9, 0.2
    mask = _completion_mask(2 * B, T, 0)
    ids = torch.zeros(2 * B, T, dtype=torch.long)
    per_token = _per_token(0, 2 * B, T, mask)
    ref = (-(torch.rand(2 * B) * 10)).float()
    stub = SimpleNamespace(
        model=_FusedModel({}), accelerator=_accelerator(), aux_loss_enabled=False, precompute_ref_logps=True,
        ld_alpha=None, f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0], beta=beta,
        label_smoothing=e, use_weighting=False, _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0, _tp_size=1)
    model = _FusedModel({id(ids): per_token})
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": mask,
              "ref_chosen_logps": ref[:B], "ref_rejected_logps": ref[B:]}
    trl_loss = trl.DPOTrainer._compute_loss(stub, model, inputs, False)
    (trl_grad,) = torch.autograd.grad(trl_loss, per_token)

    sums = per_token.sum(-1)
    lengths = mask.sum(-1)
    ours = dpo_loss(sums[:B], sums[B:], ref[:B], ref[B:], beta, loss_type, e, lengths[:B], lengths[B:])
    our_loss = ours.losses.mean()
    (our_grad,) = torch.autograd.grad(our_loss, per_token)
    assert torch.allclose(our_loss, trl_loss, rtol=1e-6, atol=1e-7)
    assert torch.allclose(our_grad, trl_grad, rtol=1e-5, atol=1e-8)
    m = stub._metrics["train"]
    assert m["rewards/chosen"][0] == pytest.approx(float(ours.chosen_rewards.mean()), rel=1e-6)
    assert m["rewards/rejected"][0] == pytest.approx(float(ours.rejected_rewards.mean()), rel=1e-6)


def test_kto_equals_trl_kto_trainer_loss():
    trl = pytest.importorskip("trl")
    T, beta, n = 8, 0.3, 6
    mask, kl_mask = _completion_mask(n, T, 1), _completion_mask(n, T, 2)
    ids, kl_ids = torch.zeros(n, T, dtype=torch.long), torch.ones(n, T, dtype=torch.long)
    per_token, kl_tokens = _per_token(1, n, T, mask), _per_token(2, n, T, kl_mask).detach()
    label = torch.tensor([True, False, True, True, False, False])
    ref, ref_kl = -(torch.rand(n) * 10), -(torch.rand(n) * 10) - 5
    stub = SimpleNamespace(
        model=_FusedModel({}), accelerator=_accelerator(), aux_loss_enabled=False, precompute_ref_logps=True,
        calculate_KL=True, loss_type="kto", beta=beta, desirable_weight=1.2, undesirable_weight=0.8,
        _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1,
        _compute_kl_logps=None)
    model = _FusedModel({id(ids): per_token, id(kl_ids): kl_tokens})
    stub._compute_kl_logps = lambda m, batch: trl.KTOTrainer._compute_kl_logps(stub, m, batch)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": mask, "label": label,
              "KL_input_ids": kl_ids, "KL_attention_mask": torch.ones_like(kl_ids), "KL_completion_mask": kl_mask,
              "ref_logps": ref, "ref_KL_logps": ref_kl}
    trl_loss = trl.KTOTrainer._compute_loss(stub, model, inputs, False)
    (trl_grad,) = torch.autograd.grad(trl_loss, per_token)

    sums = per_token.sum(-1)
    kl = kto_kl(kl_tokens.sum(-1), ref_kl)
    ours = kto_loss(sums[label], sums[~label], ref[label], ref[~label], kl, beta, 1.2, 0.8)
    our_loss = ours.losses.mean()
    (our_grad,) = torch.autograd.grad(our_loss, per_token)
    assert torch.allclose(our_loss, trl_loss, rtol=1e-6, atol=1e-7)
    assert torch.allclose(our_grad, trl_grad, rtol=1e-5, atol=1e-8)
    assert stub._metrics["train"]["kl"][0] == pytest.approx(float(kl), rel=1e-6)


def test_orpo_and_simpo_equal_trl():
    pytest.importorskip("trl")
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer

    pc, pr = (-(torch.rand(B) * 2 + 0.05)).requires_grad_(), (-(torch.rand(B) * 2 + 0.05)).requires_grad_()
    stub = SimpleNamespace(beta=0.15, accelerator=_accelerator())
    trl_losses, trl_c, trl_r, _, trl_log_odds = ORPOTrainer.odds_ratio_loss(stub, pc, pr)
    ours, log_odds = orpo_loss(pc, pr, beta=0.15)
    assert torch.allclose(ours.losses, -trl_losses, rtol=1e-6, atol=1e-7)
    assert torch.allclose(log_odds.mean(), trl_log_odds, rtol=1e-6)
    assert torch.allclose(ours.chosen_rewards, trl_c) and torch.allclose(ours.rejected_rewards, trl_r)
    g_trl = torch.autograd.grad(-trl_losses.mean(), (pc, pr))
    g_ours = torch.autograd.grad(ours.losses.mean(), (pc, pr))
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-8) for a, b in zip(g_ours, g_trl))

    stub = SimpleNamespace(alpha=0.0, loss_type="simpo", beta=2.5, simpo_gamma=0.6, label_smoothing=0.05,
                           accelerator=_accelerator())
    trl_losses, trl_c, trl_r = CPOTrainer.cpo_loss(stub, pc, pr)
    ours = simpo_loss(pc, pr, beta=2.5, simpo_gamma=0.6, label_smoothing=0.05)
    assert torch.allclose(ours.losses, trl_losses, rtol=1e-6, atol=1e-7)
    assert torch.allclose(ours.chosen_rewards, trl_c) and torch.allclose(ours.rejected_rewards, trl_r)
