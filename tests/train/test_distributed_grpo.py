"""GRPO data-parallel on 2 CPU processes (gloo), TRL's way: each rank samples its contiguous share of the
generation batch (here a group spans both ranks), the rewards are gathered for the groups' advantages, and the
loss is normalised over every rank. On the completions the ranks drew, 2 ranks x batch B give the loss, the
metrics and every LoRA gradient of 1 rank x batch 2B on all of them (loss types dapo, grpo with beta > 0 and old
log-probs, dr_grpo, and grpo with truncated completions masked, where ranks run zero-loss stand-ins); a short ``train()`` keeps the ranks' adapters equal; and ``pronghorn train --method grpo``
runs under torchrun.

The pytest process is the 1-rank reference; this same file, run as a script, is the worker of each rank.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

if __name__ == "__main__":  # worker: make tests/ importable like pytest does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytest
import torch

from grpo_cases import grpo_trainer
from rank_launcher import ROOT, close, free_port, rank_results, run_workers, save_rank_results, worker_env
from pronghorn.train import grpo_trainer as grpo_trainer_module
from pronghorn.train.grpo_rollout import Rollout

# 3 prompts x G = 4: 12 completions a generation batch, 6 per rank: rank 0 holds prompt 0's group and half of
# prompt 1's, rank 1 the other half and prompt 2's. One generation batch per step (steps_per_generation = 3).
G, B, GA = 4, 2, 3
PROMPTS = [{"prompt": f"p{i}", "prompt_ids": ids} for i, ids in enumerate([[5, 9, 14], [7, 3, 22, 40, 8], [61, 4]])]
CASES = {"dapo": dict(loss_type="dapo"), "grpo": dict(loss_type="grpo", beta=0.1, num_iterations=2),
         "dr_grpo": dict(loss_type="dr_grpo", top_k=5),
         # completions cut at 3 tokens carry no loss: a micro-batch of a rank may have nothing to train (stand-in)
         "masked": dict(loss_type="grpo", mask_truncated_completions=True, stop_strings=["e"], max_completion_length=3)}
TIMING = ("generation_tokens_per_s", "generation_s", "train_tokens_per_s", "train_s")


def _trainer(out: Path, batch_size: int, case: str, **extra):
    settings = {"max_completion_length": 6, **CASES[case], **extra}
    return grpo_trainer(out, prompts=PROMPTS, num_generations=G, batch_size=batch_size, gradient_accumulation_steps=GA,
                        seed=7, **settings)


def _grads(t) -> dict:
    return {n: p.grad.detach().clone() for n, p in t.model.named_parameters() if p.requires_grad}


def _rank_step(out: Path, case: str) -> dict:
    """This rank's first step: its completions as drawn (before the shuffle), loss, metrics, gradients."""
    drawn = []
    real = grpo_trainer_module.rollout

    def spy(*args, **kwargs):
        drawn.append(real(*args, **kwargs))
        return drawn[-1]

    grpo_trainer_module.rollout = spy
    try:
        t = _trainer(out, B, case)
        step = t.step_examples(0)
    finally:
        grpo_trainer_module.rollout = real
    loss, tokens = t.accumulate_gradients(step)
    ro = drawn[0]
    return {"loss": loss, "tokens": tokens, "metrics": t.step_metrics(), "grads": _grads(t),
            "rollout": (ro.prompt_ids, ro.completion_ids, ro.completions, ro.truncated),
            "old": t.keeps_old_logps, "empty": sum(not gen.micro[k].tokens for gen, k in step.parts)}


def _train(out: Path) -> dict:
    t = _trainer(out, B, "grpo", max_steps=2)
    curve = t.train().losses
    return {"curve": curve, "adapter": {n: p.detach().clone() for n, p in t.model.named_parameters() if p.requires_grad}}


def _worker(out: Path) -> int:
    runs = {case: lambda case=case: _rank_step(out / case, case) for case in CASES}
    return save_rank_results(out, {**runs, "train": lambda: _train(out / "train")})


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return run_workers(__file__, tmp_path_factory.mktemp("grpo-ranks"))


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_equal_one_rank_with_twice_the_batch_on_their_completions(two_ranks, tmp_path, case):
    ranks = rank_results(two_ranks, case)
    parts = [r["rollout"] for r in ranks]
    assert parts[0][1] != parts[1][1]  # each rank drew its own completions
    ro = Rollout(*(sum((p[i] for p in parts), []) for i in range(4)), seconds=1.0)  # in rank order: rank 0 first
    rows = [p for p in PROMPTS for _ in range(G)]
    assert ro.prompt_ids == [r["prompt_ids"] for r in rows]  # rank r sampled the r-th contiguous share
    ref = _trainer(tmp_path, 2 * B, case)
    assert ref.keeps_old_logps == ranks[0]["old"]
    loss, tokens = ref.accumulate_gradients(ref.score_batch(rows, ro, shuffle_seed=3))
    metrics, grads = ref.step_metrics(), _grads(ref)
    for res in ranks:
        assert res["tokens"] == tokens
        assert res["loss"] == pytest.approx(loss, rel=1e-5, abs=1e-7)
        assert res["metrics"].keys() == metrics.keys()
        for k, v in metrics.items():
            if k not in TIMING:
                assert res["metrics"][k] == pytest.approx(v, rel=1e-4, abs=1e-6), k
        assert res["grads"].keys() == grads.keys()
        for n, g in grads.items():  # averaged over the ranks: the whole generation batch's gradient
            assert close(res["grads"][n], g, 1e-5), n
    assert metrics["reward_std"] > 0 and metrics["completions/mean_length"] > 1
    if case == "masked":  # stand-ins ran (measured: rank 0 for 2 of its 3 micro-batches, rank 1 for all 3)
        empty = [r["empty"] for r in ranks]
        assert 0 < sum(empty) < 2 * GA and tokens > 0, empty


def test_train_keeps_the_ranks_adapters_equal(two_ranks):
    ranks = rank_results(two_ranks, "train")
    assert len(ranks[0]["curve"]) == 2 and ranks[0]["curve"] == ranks[1]["curve"]  # the loss over both ranks
    for n, w in ranks[0]["adapter"].items():
        assert torch.equal(w, ranks[1]["adapter"][n]), n
    rows = [json.loads(line) for line in (two_ranks / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and "kl" in rows[0]  # written once, by rank 0


def test_cli_grpo_under_torchrun(tmp_path, tiny_smollm2_dir):
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": f"Say {w}"}]}) + "\n"
                            for w in ("hi", "bye", "yes", "no")))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), "-m", "pronghorn.cli", "--", "train", "--model", str(tiny_smollm2_dir), "--data",
           str(data), "--method", "grpo", "--reward-funcs", "pronghorn.train.rewards:gsm8k_format",
           "--num-generations", "2", "--batch-size", "2", "--gradient-accumulation-steps", "1",
           "--max-completion-length", "4", "--max-steps", "2", "--r", "4", "--dtype", "float32", "--no-progress",
           "--output-dir", str(tmp_path / "out")]
    res = subprocess.run(cmd, cwd=ROOT, env=worker_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    assert res.stdout.count("2 ranks (auto)") == 1 and res.stdout.count("saved adapter to") == 1
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and "rewards/gsm8k_format/mean" in rows[0]


if __name__ == "__main__":
    from pronghorn.train.distributed import exit_now

    exit_now(_worker(Path(sys.argv[1])))  # as the CLI ends: teardown can abort (-6)
