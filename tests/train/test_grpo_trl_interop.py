"""pronghorn's model under TRL's GRPOTrainer (use_vllm=False), unpatched: TRL generates with our ``generate`` (its
GenerationConfig honoured), scores with its fused LM head over our hidden states, and trains. On a fixed batch of
completions TRL's loss (its ``compute_loss`` on inputs in its format) and the LoRA gradients equal our trainer's,
for each loss type, with and without the KL term, with one pass and with old log-probs from before a step, with a
generation batch split over two steps (``steps_per_generation=2``: the second step's half) and with truncated
completions masked (``mask_truncated_completions``: TRL's rule, last token not EOS / pad, zeroes their mask)."""

from __future__ import annotations

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from pronghorn import FastLanguageModel  # noqa: E402
from pronghorn.train.config import TrainConfig  # noqa: E402
from pronghorn.train.grpo_advantages import group_advantages  # noqa: E402
from pronghorn.train.grpo_rollout import Rollout, left_pad  # noqa: E402
from pronghorn.train.grpo_trainer import GRPOTrainer, StepBatch  # noqa: E402

G = 4
# fp64 weights: our side is then exact (tests/train/test_grpo_loss.py), and what is left is TRL's fused log-prob
# head, which computes in fp32 whatever the weights' dtype (trl/kernels/chunked_logprob.py): about 1e-7 relative
# per log-prob, up to 2.0e-6 of the largest entry of a LoRA gradient here (measured)
DTYPE = torch.float64


def length_reward(prompts, completions, **_):
    return [float(len(c)) for c in completions]


def _model(tiny_smollm2_dir):
    model, tok = FastLanguageModel.from_pretrained(str(tiny_smollm2_dir), dtype=DTYPE)
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    with torch.no_grad():  # B starts at zero; give it values so A's gradients are tested too
        g = torch.Generator().manual_seed(1)
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.2)
    return model, tok


def _trl(model, tok, tmp_path, **config):
    settings = dict(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=G, num_generations=G,
                    max_completion_length=6, max_steps=2, learning_rate=5e-3, logging_steps=1, report_to=[],
                    save_strategy="no", use_cpu=True, bf16=False, seed=0, beta=0.0)
    rows = [{"prompt": "Say something:"}, {"prompt": "Count to three:"}]
    return trl.GRPOTrainer(model=model, reward_funcs=[length_reward], processing_class=tok,
                           args=trl.GRPOConfig(**{**settings, **config}), train_dataset=datasets.Dataset.from_list(rows))


def test_trl_grpo_trains_the_pronghorn_model(tiny_smollm2_dir, tmp_path):
    model, tok = _model(tiny_smollm2_dir)
    trainer = _trl(model, tok, tmp_path)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer.train()
    logs = [h for h in trainer.state.log_history if "reward" in h]
    assert len(logs) == 2 and all("loss" in h for h in logs)
    assert all(0 < h["completions/mean_length"] <= 6 for h in logs)  # max_completion_length reached our decoder
    assert any(h["reward_std"] > 0 for h in logs)  # sampled (do_sample from TRL's GenerationConfig), not greedy
    moved = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert moved
    # TRL's advantages of its last generation batch (its completion table) are ours from the same rewards
    rewards = torch.tensor(list(trainer._logs["rewards"]["length_reward"]))
    ours, _ = group_advantages(rewards, G, "group")
    torch.testing.assert_close(ours, torch.tensor(list(trainer._logs["advantages"])), rtol=1e-6, atol=1e-6)


def _fixed_rollout(tok):
    prompts = [tok("Say something:")["input_ids"], tok("Count to three, please:")["input_ids"]]
    g = torch.Generator().manual_seed(0)
    completions = []
    for i in range(2 * G):
        n = int(torch.randint(1, 7, (1,), generator=g))
        ids = torch.randint(10, 2000, (n,), generator=g).tolist()
        completions.append(ids[:-1] + [tok.eos_token_id] if i % 3 == 0 else ids)
    texts = tok.batch_decode(completions, skip_special_tokens=True)
    rows = [{"prompt": text} for text in ("Say something:", "Count to three, please:") for _ in range(G)]
    truncated = [c[-1] != tok.eos_token_id for c in completions]  # as if each had reached max_completion_length
    return rows, Rollout([p for p in prompts for _ in range(G)], completions, texts, truncated, 1.0)


def _trl_inputs(trainer, batch, tok, device, part=slice(None), mask_truncated=False):
    """TRL's inputs for completions ``part`` of our generation batch: what its ``_generate_and_score_completions``
    hands to ``compute_loss`` (``num_items_in_batch``: the loss tokens of the whole generation batch)."""
    ro = batch.rollout
    prompt_ids, prompt_mask = left_pad(ro.prompt_ids, tok.pad_token_id)
    width = max(len(c) for c in ro.completion_ids)
    completion_ids = torch.full((len(ro.completion_ids), width), tok.pad_token_id)
    completion_mask = torch.zeros_like(completion_ids)
    for b, c in enumerate(ro.completion_ids):
        completion_ids[b, :len(c)] = torch.tensor(c)
        completion_mask[b, :len(c)] = 1
    if mask_truncated:  # TRL's rule, on its own eos ids
        ends = [*trainer.eos_token_ids, tok.pad_token_id]
        is_truncated = torch.tensor([c[-1] not in ends for c in ro.completion_ids])
        assert is_truncated.tolist() == ro.truncated and is_truncated.any() and not is_truncated.all()
        completion_mask = completion_mask * (~is_truncated).unsqueeze(1).int()
    inputs = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
              "completion_mask": completion_mask, "advantages": batch.advantages}
    if batch.old_logps is not None:
        inputs["old_per_token_logps"] = batch.old_logps
    if batch.ref_logps is not None:
        inputs["ref_per_token_logps"] = batch.ref_logps
    inputs = {k: v[part] for k, v in inputs.items()}
    inputs["num_items_in_batch"] = completion_mask.sum()
    return {k: v.to(device) for k, v in inputs.items()}


def _grads(model):
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("loss_type,beta,iterations,steps_per_generation,mask_truncated", [
    ("dapo", 0.0, 1, None, False), ("grpo", 0.04, 1, None, False), ("dr_grpo", 0.04, 2, None, False),
    ("dapo", 0.04, 2, None, False), ("grpo", 0.0, 2, None, False), ("dapo", 0.04, 1, 2, False),
    ("grpo", 0.04, 1, 2, True), ("dapo", 0.0, 2, None, True), ("dr_grpo", 0.0, 1, 2, True)])
def test_trl_loss_and_grads_equal_ours_on_a_fixed_batch(tiny_smollm2_dir, tmp_path, loss_type, beta, iterations,
                                                         steps_per_generation, mask_truncated):
    model, tok = _model(tiny_smollm2_dir)
    settings = dict(loss_type=loss_type, beta=beta, num_iterations=iterations, epsilon=0.05, epsilon_high=0.08,
                    temperature=0.8, max_completion_length=6, mask_truncated_completions=mask_truncated,
                    steps_per_generation=steps_per_generation)
    # one generation batch of 2 prompts x G: in one step (2 x 4 micro-batches), or (steps_per_generation=2) over
    # two steps of one micro-batch of G, TRL's per_device_train_batch_size=G
    split = steps_per_generation is not None
    shape = dict(batch_size=G, gradient_accumulation_steps=1) if split else dict(batch_size=2,
                                                                                 gradient_accumulation_steps=4)
    ours = GRPOTrainer(model, tok, [{"prompt": "x"}, {"prompt": "y"}], TrainConfig(
        method="grpo", output_dir=str(tmp_path / "ours"), progress=False, num_generations=G,
        reward_funcs=[length_reward], gradient_checkpointing="off", **shape, **settings))
    rows, ro = _fixed_rollout(tok)
    batch = ours.score_batch(rows, ro)  # our advantages, old and reference log-probs: inputs to both losses
    if iterations > 1 or split:  # a later pass over the batch, or its second step: the policy moved since then
        with torch.no_grad():
            for n, p in model.named_parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))).to(p.dtype) * 0.05)
    loss, _ = ours.accumulate_gradients(StepBatch([(batch, 1)], []) if split else batch)
    want = _grads(model)

    trainer = _trl(model, tok, tmp_path, **{**settings, "beta": 0.0})
    # TRL 1.16 builds a second model from the config's path as the reference when beta > 0 and the policy is not a
    # peft.PeftModel (it has no ref_model argument); the reference log-probs are an input of the loss here, ours
    trainer.beta = beta
    trainer.current_gradient_accumulation_steps = 1  # set by its training loop; one call per step here
    assert trainer.args.steps_per_generation == (2 if split else 1)
    model.train()
    part = slice(G, 2 * G) if split else slice(None)  # the second step's micro-batch: the batch's second half
    trl_loss = trainer.compute_loss(model, _trl_inputs(trainer, batch, tok, model.device, part, mask_truncated))
    trl_loss.backward()
    got = _grads(model)
    assert abs(float(trl_loss.detach()) - loss) <= 2e-6 * max(1.0, abs(loss)), (float(trl_loss.detach()), loss)
    for name, g in got.items():
        scale = want[name].abs().max()
        assert scale > 0, name
        assert (g - want[name]).abs().max() <= 4e-6 * scale, name
    assert ours.step_metrics()["clip_ratio/region_mean"] >= 0
