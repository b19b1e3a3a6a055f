"""GRPO's loss and LoRA gradients, as the trainer computes them (packed padding-free forward, chunked log-prob
head, micro-batches accumulated), equal a plain PyTorch implementation of the formulas: each completion run
alone through the model's full logits, ``log_softmax``, and the objective written out per token below; also with
truncated completions masked (``mask_truncated_completions``) and with a generation batch split over two steps
(``steps_per_generation``); the ``entropy`` metric equals the mean entropy of the full logits' distributions.

fp64 shows the algebra is exact (1e-12). fp32's bound is what fp32 log-probs allow: a log-prob near
-log(97) = -4.6 is held to about 2^-24 * 4.6 = 3e-7 absolute, and ``exp(logp - old)`` turns that absolute error
into the ratio's relative error, so the ratio-weighted gradients agree to a few 1e-6 of their largest entry
(measured: at most 2.5e-6), while with one pass per batch (ratio exactly 1) they agree to 2e-6."""

from __future__ import annotations

import math

import pytest
import torch

from grpo_cases import G, fixed_batch, grpo_trainer
from pronghorn.train.grpo_advantages import group_advantages
from pronghorn.train.grpo_loss import grpo_loss
from pronghorn.train.grpo_trainer import StepBatch
from pronghorn.train.preference_trainer import adapters_disabled


def plain_logps(model, prompt, completion, temperature, entropy=False):
    """log softmax(logits / T) of each completion token, the sequence run alone with full logits; with ``entropy``
    also the entropy of each of those distributions."""
    ids = torch.tensor([prompt + completion])
    logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].double() / temperature
    logp = logits.log_softmax(-1)
    picked = logp.gather(-1, torch.tensor(completion)[:, None])[:, 0]
    return (picked, -(logp.exp() * logp).sum(-1).detach()) if entropy else picked


def plain_loss(cur, old, ref, adv, loss_type, beta, eps_low, eps_high, max_len, keep=None, sequences=None,
               tokens=None):
    """The objective token by token: -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A) + beta r k3(ref, cur).
    ``keep[i]`` False: completion i carries no loss (mask_truncated_completions) but is still one of the
    completions grpo / dr_grpo divide by; ``sequences`` / ``tokens``: the step's completions and dapo's token
    count when they are not those of ``cur``."""
    keep = [True] * len(cur) if keep is None else keep
    per_seq = []
    for i, logp in enumerate(cur):
        if not keep[i]:
            continue
        terms = []
        for t in range(logp.shape[0]):
            r = torch.exp(logp[t] - old[i][t])
            term = -torch.minimum(r * adv[i], torch.clamp(r, 1 - eps_low, 1 + eps_high) * adv[i])
            if beta:  # k3, times the ratio (use_bias_correction_kl, TRL's default)
                d = ref[i][t] - logp[t]
                term = term + beta * (torch.exp(d) - d - 1) * r
            terms.append(term)
        per_seq.append(torch.stack(terms))
    sequences = len(cur) if sequences is None else sequences
    tokens = sum(s.numel() for s in per_seq) if tokens is None else tokens
    if loss_type == "grpo":
        return sum(s.mean() for s in per_seq) / sequences
    if loss_type == "dapo":
        return sum(s.sum() for s in per_seq) / tokens
    return sum(s.sum() for s in per_seq) / (sequences * max_len)


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _move_policy(model, scale=0.05):
    """What an optimizer step does to the adapters: a later step on the same batch sees a moved policy."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))).to(p.dtype) * scale)


def _plain_inputs(t, ro, temperature):
    """(old, reference) log-probs of the fixed batch's completions, plain, and its group advantages."""
    model = t.model
    with torch.no_grad():
        old = [plain_logps(model, p, c, temperature) for p, c in zip(ro.prompt_ids, ro.completion_ids)]
        with adapters_disabled(model):
            ref = [plain_logps(model, p, c, temperature) for p, c in zip(ro.prompt_ids, ro.completion_ids)]
    rewards = torch.tensor([float(sum(c) % 7) for c in ro.completion_ids])
    return old, ref, group_advantages(rewards, G, "group")[0].double()


def _check_step(t, batch, expected, tol):
    """The trainer's loss and LoRA gradients of ``batch`` (a generation batch, or a step's micro-batches) against
    the plain ``expected`` loss and its gradients, each within ``tol`` of its scale."""
    expected.backward()
    want = _grads(t.model)
    t.model.zero_grad(set_to_none=True)
    loss, _ = t.accumulate_gradients(batch)
    got = _grads(t.model)
    t.model.zero_grad(set_to_none=True)
    assert abs(loss - float(expected.detach())) <= tol * max(1.0, abs(float(expected.detach()))), loss  # |A| ~ 1
    for name, g in got.items():
        scale = want[name].abs().max()
        assert scale > 0, name
        assert (g.double() - want[name].double()).abs().max() <= tol * scale, name


def _masked_mean(values, keep):
    kept = [v for v, k in zip(values, keep) if k]
    return float(torch.cat(kept).mean())


@pytest.mark.parametrize("dtype,iterations", [(torch.float64, 1), (torch.float64, 2), (torch.float32, 2)],
                         ids=["fp64-1pass", "fp64-2passes", "fp32-2passes"])
@pytest.mark.parametrize("beta", [0.0, 0.3])
@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_trainer_loss_and_lora_grads_equal_the_formulas(tmp_path, loss_type, beta, iterations, dtype):
    temperature = 0.7 if iterations == 2 else 1.0
    tol = 1e-12 if dtype == torch.float64 else 2e-6 if iterations == 1 else 4e-6
    t = grpo_trainer(tmp_path, dtype=dtype, loss_type=loss_type, beta=beta, num_iterations=iterations,
                     epsilon=0.05, epsilon_high=0.08, temperature=temperature)
    model = t.model
    rows, ro = fixed_batch()
    batch = t.score_batch(rows, ro)  # rewards, advantages, old (iterations > 1) and reference log-probs
    pairs = list(zip(ro.prompt_ids, ro.completion_ids))
    old, ref, adv = _plain_inputs(t, ro, temperature)
    if iterations > 1:  # a later step on the same batch: the policy has moved away from the old log-probs
        _move_policy(model)
        torch.testing.assert_close(batch.old_logps[0, :len(ro.completion_ids[0])].double(), old[0],
                                   rtol=0, atol=1e-12 if dtype == torch.float64 else 1e-6)
    cur, entropy = zip(*[plain_logps(model, p, c, temperature, entropy=True) for p, c in pairs])
    expected = plain_loss(cur, old if iterations > 1 else [c.detach() for c in cur], ref, adv, loss_type, beta,
                          0.05, 0.08, 9)
    _check_step(t, batch, expected, tol)
    metrics = t.step_metrics()
    # TRL's entropy metric: the policy's mean token entropy (of softmax(logits / T)) over the step's completion tokens
    assert metrics["entropy"] == pytest.approx(_masked_mean(entropy, [True] * len(pairs)), abs=2e-6)
    if iterations > 1:  # the moved policy clips some tokens, and the metric counts them
        assert metrics["clip_ratio/region_mean"] > 0
    if beta:
        assert metrics["kl"] > 0


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_masked_truncated_completions_carry_no_loss(tmp_path, loss_type):
    """``mask_truncated_completions``: the fixed batch's truncated completions (no EOS: every other one, in both
    groups) carry no loss, as TRL zeroes their completion mask: grpo still divides by all 6 completions, dapo by the
    tokens left, dr_grpo by 6 * max_completion_length. They are left out of the training forward, their rewards
    still count in the advantages, and the step's metrics (entropy, kl) average over the tokens left. fp64, a moved
    policy against old log-probs, beta > 0."""
    t = grpo_trainer(tmp_path, dtype=torch.float64, loss_type=loss_type, beta=0.3, num_iterations=2, epsilon=0.05,
                     epsilon_high=0.08, temperature=0.7, mask_truncated_completions=True)
    rows, ro = fixed_batch()
    keep = [not cut for cut in ro.truncated]
    assert 0 < sum(keep) < len(keep)
    batch = t.score_batch(rows, ro)
    assert batch.loss_tokens == sum(len(c) for c, k in zip(ro.completion_ids, keep) if k)
    packed = sum(p.tokens for p in batch.micro)
    assert packed == sum(len(p) + len(c) for p, c, k in zip(ro.prompt_ids, ro.completion_ids, keep) if k)
    assert batch.old_logps[~torch.tensor(keep)].abs().sum() == 0  # not computed for them either
    old, ref, adv = _plain_inputs(t, ro, 0.7)
    torch.testing.assert_close(batch.advantages.double(), adv, rtol=0, atol=1e-6)  # from every reward
    _move_policy(t.model)
    cur, entropy = zip(*[plain_logps(t.model, p, c, 0.7, entropy=True)
                         for p, c in zip(ro.prompt_ids, ro.completion_ids)])
    expected = plain_loss(cur, old, ref, adv, loss_type, 0.3, 0.05, 0.08, 9, keep=keep)
    _check_step(t, batch, expected, 1e-12)
    metrics = t.step_metrics()
    assert metrics["entropy"] == pytest.approx(_masked_mean(entropy, keep), abs=2e-6)
    kl = [torch.exp(r - c) - (r - c) - 1 for r, c in zip(ref, cur)]
    kl = [k.detach() * torch.exp(c.detach() - o) for k, c, o in zip(kl, cur, old)]  # times the ratio
    assert metrics["kl"] == pytest.approx(_masked_mean(kl, keep), abs=2e-6)


def test_a_micro_batch_of_masked_completions_runs_nothing(tmp_path):
    """Every completion of a micro-batch truncated and masked: no forward, no loss, no gradient from it; the other
    micro-batches train as usual."""
    t = grpo_trainer(tmp_path, dtype=torch.float64, mask_truncated_completions=True)
    rows, ro = fixed_batch()
    ro.truncated[:2] = [True, True]  # micro-batch 0 (batch_size 2): both cut
    batch = t.score_batch(rows, ro)
    assert batch.micro[0].tokens == 0 and batch.micro[0].mask.sum() == 0
    loss, tokens = t.accumulate_gradients(batch)
    assert tokens == sum(p.tokens for p in batch.micro[1:]) and math.isfinite(loss)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in t.model.parameters())


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_steps_per_generation_splits_a_generation_batch_over_steps(tmp_path, loss_type):
    """``steps_per_generation=2`` with batch_size 3 and gradient_accumulation_steps 1: the fixed batch of 6 is one
    generation batch; step 1 trains on its first micro-batch, step 2 on the second after step 1 moved the policy.
    The old log-probs are kept (TRL's rule: 1 % (2 * 1) != 0), so step 2's ratio is against the policy that
    generated; the normalisers are TRL's: grpo and dr_grpo over the step's 3 completions, dapo over the generation
    batch's tokens times 1 / 2. fp64, beta > 0."""
    t = grpo_trainer(tmp_path, dtype=torch.float64, loss_type=loss_type, beta=0.3, batch_size=3,
                     gradient_accumulation_steps=1, steps_per_generation=2, epsilon=0.05, epsilon_high=0.08)
    assert t.keeps_old_logps and t.steps_per_generation == 2
    rows, ro = fixed_batch()
    batch = t.score_batch(rows, ro)
    old, ref, adv = _plain_inputs(t, ro, 1.0)
    tokens = sum(len(c) for c in ro.completion_ids)
    for k in (0, 1):
        if k:
            _move_policy(t.model)
        part = slice(3 * k, 3 * k + 3)
        cur = [plain_logps(t.model, p, c, 1.0) for p, c in zip(ro.prompt_ids[part], ro.completion_ids[part])]
        expected = plain_loss(cur, old[part], ref[part], adv[part], loss_type, 0.3, 0.05, 0.08, 9, sequences=3,
                              tokens=tokens / 2)
        _check_step(t, StepBatch([(batch, k)], []), expected, 1e-12)
    assert t.step_metrics()["clip_ratio/region_mean"] > 0  # step 2's ratios moved off 1


def test_loss_aggregations_and_metrics_on_hand_made_numbers():
    logps = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, -0.25, -3.0]])
    old = logps - torch.tensor([[0.5, 0.0, 0.0], [-0.5, 0.0, 0.0]])  # ratios e^0.5 and e^-0.5 on the first tokens
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    adv = torch.tensor([1.0, -1.0])
    r = torch.exp(torch.tensor(0.5))
    # token losses: row 0: -min(r, 1.2) = -1.2, -1; row 1: -min(-e^-0.5, -0.8) = 0.8, 1, 1
    rows = [[-1.2, -1.0], [0.8, 1.0, 1.0]]
    want = {"grpo": (sum(rows[0]) / 2 + sum(rows[1]) / 3) / 2, "dapo": (sum(rows[0]) + sum(rows[1])) / 5,
            "dr_grpo": (sum(rows[0]) + sum(rows[1])) / (2 * 4)}
    for loss_type, value in want.items():
        out = grpo_loss(logps, old, None, adv, mask, loss_type=loss_type, beta=0.0, epsilon=0.2,
                        max_completion_length=4)
        assert float(out.loss) == pytest.approx(value, abs=1e-6), loss_type
        assert float(out.sums["clip_ratio/high_mean"]) == 1 and float(out.sums["clip_ratio/low_mean"]) == 1
        assert float(out.sums["clip_ratio/region_mean"]) == 2 and float(out.sums["tokens"]) == 5
    assert r > 1.2


def test_group_advantages_and_none_rewards():
    from pronghorn.train.grpo_advantages import combine_rewards

    per_func = torch.tensor([[1.0, float("nan")], [0.0, 2.0], [float("nan"), float("nan")], [3.0, 1.0]])
    rewards = combine_rewards(per_func, torch.tensor([1.0, 0.5]))
    assert rewards[:2].tolist() == [1.0, 1.0] and torch.isnan(rewards[2]) and float(rewards[3]) == 3.5
    groups = torch.tensor([1.0, 2.0, 4.0, 5.0, 5.0, 5.0])
    adv, std = group_advantages(groups, 3, "group")
    s = torch.tensor([1.0, 2.0, 4.0]).std()  # sample std (n - 1), as TRL's nanstd
    torch.testing.assert_close(adv[:3], (torch.tensor([1.0, 2.0, 4.0]) - 7 / 3) / (s + 1e-4))
    assert adv[3:].tolist() == [0.0, 0.0, 0.0] and float(std[4]) == 0
    adv, _ = group_advantages(groups, 3, "batch")
    torch.testing.assert_close(adv[:3], (torch.tensor([1.0, 2.0, 4.0]) - 7 / 3) / (groups.std() + 1e-4))
    adv, _ = group_advantages(groups, 3, "none")
    torch.testing.assert_close(adv[:3], torch.tensor([1.0, 2.0, 4.0]) - 7 / 3)
    adv, _ = group_advantages(torch.tensor([1.0, float("nan"), 3.0, 0.0]), 2, "group")
    assert float(adv[1]) == 0.0 and not torch.isnan(adv).any()  # an unscorable completion: no signal


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_packed_logps_of_a_soft_capped_family(temperature):
    """A family that caps its final logits (c tanh(x / c)): the log-probs are of softcap(logits) / T, as sampling
    draws them, and so are the entropies (T = 1: from the chunked head's capped logits; T = 0.7: from the full
    logits). (Gemma 2's config also caps attention scores; its packed rows differ from the sequences run alone
    by ~2e-7 in fp64, outside GRPO: reported, not covered here.)"""
    from helpers import make_pair, randomize_lora_b
    from pronghorn.models.lora import LoRAConfig, attach_lora
    from pronghorn.train.grpo_logps import pack_completions, packed_logps

    model = make_pair("gemma3_text_softcap", dtype=torch.float64)[1]
    attach_lora(model, LoRAConfig(r=4, lora_alpha=8), seed=1)
    randomize_lora_b(model)
    rows, ro = fixed_batch()
    with torch.no_grad():
        got, entropy = packed_logps(model, pack_completions(ro.prompt_ids, ro.completion_ids, 9), temperature,
                                    entropy=True)
        for i, (p, c) in enumerate(zip(ro.prompt_ids, ro.completion_ids)):
            want, want_entropy = plain_logps(model, p, c, temperature, entropy=True)
            torch.testing.assert_close(got[i, :len(c)], want, rtol=0, atol=1e-12)
            torch.testing.assert_close(entropy[i, :len(c)], want_entropy, rtol=0, atol=1e-12)
            assert (entropy[i, len(c):] == 0).all()
