"""DPO and KTO data-parallel on 2 CPU processes (gloo): 2 ranks x batch B == 1 rank x batch 2B, the trainer's
gradients, losses, metrics and final adapter (a short last step leaves one rank a filler micro-batch; DPO with
gradient accumulation), and ``pronghorn train --method dpo | kto`` under torchrun against one process.

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

from helpers import preference_lora_model, random_kto_rows, random_pairs
from rank_launcher import ROOT, close, free_port, rank_results, run_workers, save_rank_results, worker_env
from pronghorn.train.config import TrainConfig
from pronghorn.train.preference_trainer import PreferenceTrainer

# 9 rows: DPO steps of 8 (2 ranks x 2 x 2 micro-batches) leave 1 row for step 2, so rank 1 runs a filler;
# KTO steps of 4 (no accumulation: its KL estimate is per micro-batch) leave 1 row for step 3.
RUNS = {"dpo": dict(gradient_accumulation_steps=2, max_steps=3), "kto": dict(gradient_accumulation_steps=1,
                                                                             max_steps=3)}
N_ROWS = 9


class _Tokenizer:  # the trainer only reads the pad/eos ids and saves the tokenizer
    pad_token_id, eos_token_id = 0, 1

    def save_pretrained(self, path):
        Path(path, "tokenizer_config.json").write_text("{}")


def _run(method: str, out: Path, batch_size: int) -> dict:
    rows = random_pairs(N_ROWS, seed=2) if method == "dpo" else random_kto_rows(N_ROWS, seed=3)
    cfg = TrainConfig(output_dir=str(out), progress=False, overwrite=True, method=method, batch_size=batch_size,
                      learning_rate=1e-2, lr_scheduler="constant", seed=4, beta=0.5, **RUNS[method])
    t = PreferenceTrainer(preference_lora_model(), _Tokenizer(), rows, cfg, base_name="tiny")
    loss, tokens = t.accumulate_gradients(t.step_examples(0))
    metrics = t.step_metrics()
    grads = {n: p.grad.detach().clone() for n, p in t.model.named_parameters() if p.requires_grad}
    t.optimizer.zero_grad(set_to_none=True)
    curve = t.train().losses
    adapter = {n: p.detach().clone() for n, p in t.model.named_parameters() if p.requires_grad}
    return {"loss": loss, "tokens": tokens, "metrics": metrics, "grads": grads, "curve": curve, "adapter": adapter}


def _worker(out: Path) -> int:
    return save_rank_results(out, {m: lambda m=m: _run(m, out / m, batch_size=2) for m in RUNS})


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return run_workers(__file__, tmp_path_factory.mktemp("preference-ranks"))


@pytest.mark.parametrize("method", list(RUNS))
def test_two_ranks_equal_one_rank_with_twice_the_batch(two_ranks, tmp_path, method):
    ref = _run(method, tmp_path, batch_size=4)
    ranks = rank_results(two_ranks, method)
    for res in ranks:
        assert res["tokens"] == ref["tokens"]
        assert res["loss"] == pytest.approx(ref["loss"], rel=1e-5)
        assert res["metrics"].keys() == ref["metrics"].keys()
        for k, v in ref["metrics"].items():
            assert res["metrics"][k] == pytest.approx(v, rel=1e-4, abs=1e-6), k
        assert res["grads"].keys() == ref["grads"].keys()
        for n, g in ref["grads"].items():  # averaged over the ranks: the big batch's gradient
            assert close(res["grads"][n], g, 1e-5), n
        assert res["curve"] == pytest.approx(ref["curve"], rel=1e-4)
        for n, w in ref["adapter"].items():
            assert close(res["adapter"][n], w, 1e-4), n


# ---------------------------------------------------------------- the CLI under torchrun ------------------------
def _data(method: str, path: Path) -> Path:
    rows = [{"prompt": f"Question {i}: is the pronghorn fast?", "chosen": "Yes, very." * (1 + i % 3),
             "rejected": "No." * (1 + i % 2)} for i in range(6)]
    if method == "kto":
        rows = [{"prompt": r["prompt"], "completion": r["chosen"] if i % 3 else r["rejected"], "label": i % 3 != 0}
                for i, r in enumerate(rows)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", ["dpo", "kto"])
def test_cli_preference_training_under_torchrun_equals_one_process(tmp_path, tiny_smollm2_dir, method):
    from pronghorn.cli import main

    data = _data(method, tmp_path / f"{method}.jsonl")
    common = ["--model", str(tiny_smollm2_dir), "--data", str(data), "--method", method, "--max-steps", "2",
              "--gradient-accumulation-steps", "1", "--r", "4", "--lora-dropout", "0", "--max-length", "48",
              "--dtype", "float32", "--learning-rate", "0.01", "--no-progress"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), "-m", "pronghorn.cli", "--", "train", *common, "--batch-size", "1",
           "--output-dir", str(tmp_path / "two")]
    res = subprocess.run(cmd, cwd=ROOT, env=worker_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    assert res.stdout.count("2 ranks (auto)") == 1 and res.stdout.count("saved adapter to") == 1
    assert main(["train", *common, "--batch-size", "2", "--output-dir", str(tmp_path / "one")]) == 0
    assert _losses(tmp_path / "two") == pytest.approx(_losses(tmp_path / "one"), rel=1e-4)


if __name__ == "__main__":
    from pronghorn.train.distributed import exit_now

    exit_now(_worker(Path(sys.argv[1])))  # as the CLI ends: teardown can abort (-6)
