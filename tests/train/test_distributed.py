"""Data-parallel training on 2 CPU processes (gloo): 2 ranks x batch B == 1 rank x batch 2B, for DDP and FSDP2,
with gradient accumulation, uneven tokens per rank and a filler micro-batch; QLoRA (NF4 base sharded) under
FSDP2; FSDP2 full fine-tuning resumed from a sharded (DCP) checkpoint; exports gathered from the shards; a dead
or stuck rank ends the others with a clear error and leaves the last checkpoint intact; ``pronghorn train``
runs under torchrun and accelerate launch.

The pytest process is the 1-rank reference; this same file, run as a script, is the worker of each rank.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # worker: make tests/ importable like pytest does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytest
import torch

from helpers import make_pair, random_examples, tiny_lora_model
from rank_launcher import close as _close, free_port as _free_port, spawn, wait as _wait, worker_env as _env
from pronghorn.data.collate import pad_batch
from pronghorn.kernels import IGNORE_INDEX
from pronghorn.train.config import TrainConfig
from pronghorn.train.distributed import fsdp_shards_integer_parameters
from pronghorn.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[2]
N_EXAMPLES = 13  # steps of 8 examples: the second step has 5, so one rank runs a filler micro-batch
TRAIN = dict(gradient_accumulation_steps=2, max_steps=3, learning_rate=1e-2, lr_scheduler="constant", seed=5)
SHORT_TIMEOUT_S = 6.0


class _Tokenizer:  # the trainer only reads the pad/eos ids and saves the tokenizer
    pad_token_id, eos_token_id = 0, 1

    def save_pretrained(self, path):
        Path(path, "tokenizer_config.json").write_text("{}")


def tiny_qlora_model():
    """QLoRA: every projection's base stored as NF4 (bitsandbytes layout), LoRA adapters on top."""
    from pronghorn.models.lora import LoRAConfig, attach_lora
    from pronghorn.models.quantized_checkpoint import quantize_model_nf4

    _, model = make_pair("llama3_gqa_rope_scaling")
    quantize_model_nf4(model)
    attach_lora(model, LoRAConfig(r=4, lora_alpha=8), seed=11)
    return model


def tiny_full_model():  # full fine-tuning (every parameter trains), tied embeddings
    return make_pair("smollm2_tied")[1]


def _trainer(out, batch_size, model_fn=tiny_lora_model, **kw) -> Trainer:
    cfg = TrainConfig(output_dir=str(out), progress=False, overwrite=True, batch_size=batch_size, **{**TRAIN, **kw})
    return Trainer(model_fn(), _Tokenizer(), random_examples(N_EXAMPLES), cfg, base_name="tiny")


def _full_tensors(model) -> dict:
    """Every parameter and buffer as a full tensor (DTensor shards gathered the plain way: full_tensor)."""
    named = list(model.named_parameters()) + list(model.named_buffers())
    return {n: (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone() for n, t in named}


def _first_grads_and_curve(out, batch_size, model_fn=tiny_lora_model, **kw) -> dict:
    t = _trainer(out, batch_size, model_fn, **kw)
    loss, tokens = t.accumulate_gradients(t.step_examples(0))
    grads = {n: p.grad.detach().clone() for n, p in t.model.named_parameters() if p.requires_grad}
    t.optimizer.zero_grad(set_to_none=True)
    sharded = hasattr(t.model.model.layers[0].mlp.up_proj.weight, "full_tensor")  # an FSDP DTensor shard
    sharded = sharded or hasattr(t.model.model.layers[0].mlp.up_proj.weight, "packed") and hasattr(
        t.model.model.layers[0].mlp.up_proj.weight.packed, "full_tensor")  # QLoRA: the NF4 bytes are sharded
    norm_sharded = hasattr(t.model.model.layers[0].input_layernorm.weight, "full_tensor")
    curve = t.train().losses
    return {"loss": loss, "tokens": tokens, "grads": grads, "curve": curve, "sharded": sharded,
            "norm_sharded": norm_sharded,
            "weights": _full_tensors(t.model), "model": t.model}


def _sharded_runs(out: Path, rank: int) -> None:
    """FSDP2 full fine-tuning, interrupted and resumed from a sharded checkpoint; QLoRA under FSDP2 and the
    exports of both from the sharded model."""
    from pronghorn.export.save import save_pretrained_merged
    from pronghorn.train.fsdp_gather import gathered

    run = dict(max_steps=4, save_steps=1, save_total_limit=2, distributed="fsdp")
    first = _trainer(out / "full", 2, tiny_full_model, **run).train().losses
    kept = [p.name for p in sorted((out / "full").glob("checkpoint-*"))]
    resumed = _trainer(out / "full", 2, tiny_full_model, resume_from_checkpoint=str(out / "full" / "checkpoint-2"),
                       **run)
    res = {"first": first, "resumed": resumed.train().losses, "kept": kept,
           "weights": _full_tensors(resumed.model)}
    q = _first_grads_and_curve(out / "qlora", 2, tiny_qlora_model, distributed="fsdp")
    with gathered(q.pop("model")) as model:  # after training: rank 0 exports from the gathered shards
        if model is not None:
            save_pretrained_merged(model, out / "qlora-merged", _Tokenizer())
    torch.save({**res, "qlora": q}, out / f"sharded-rank{rank}.pt")


def _full_finetune_grads(dp_strategy: str | None) -> dict:
    """Full fine-tuning (every parameter trains) of the same 8 examples; with a strategy, this rank's share."""
    from pronghorn.train.distributed import DataParallel, full_state_dict

    _, model = make_pair("llama3_gqa_rope_scaling")
    model.train()
    examples = random_examples(8, seed=3)
    dp = DataParallel(model, dp_strategy) if dp_strategy else None
    mine = dp.shard(examples, 2) if dp else examples
    count = sum(sum(1 for y in e["labels"][1:] if y != IGNORE_INDEX) for e in mine)
    norm = dp.loss_normalizer(count) if dp else count
    for i in range(0, len(mine), 2 if dp else 4):
        batch = pad_batch(mine[i:i + (2 if dp else 4)], 0)
        (dp.forward if dp else model)(**batch, num_items_in_batch=norm).loss.backward()
    grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).detach().clone()
             for n, p in model.named_parameters()}
    return {"grads": grads, "state": full_state_dict(model)}


# ---------------------------------------------------------------- worker (one per rank) ----------------------
def _worker(mode: str, out: Path) -> int:
    from pronghorn.errors import PronghornError
    from pronghorn.train.distributed import exit_now, failure_guard, init_distributed

    env = init_distributed(SHORT_TIMEOUT_S if mode in ("dies", "hangs") else 120.0)
    if mode == "equivalence":
        for strategy in ("ddp", "fsdp"):
            res = _first_grads_and_curve(out / strategy, 2, distributed=strategy)
            res.pop("model")
            torch.save(res, out / f"{strategy}-rank{env.rank}.pt")
        torch.save(_full_finetune_grads("fsdp"), out / f"full-rank{env.rank}.pt")
        _sharded_runs(out, env.rank)
        return 0
    t = _trainer(out, 2, max_steps=6, save_steps=1, save_total_limit=2, distributed="ddp",
                 distributed_timeout_s=SHORT_TIMEOUT_S)
    if env.rank == 1:
        real_step, calls = t.train_step, []

        def failing_step(examples):
            calls.append(1)
            if len(calls) == 3:
                if mode == "dies":
                    raise RuntimeError("injected failure on rank 1")
                time.sleep(600)  # stuck: only the timeout can end rank 0
            return real_step(examples)

        t.train_step = failing_step
    start = time.monotonic()
    try:
        with failure_guard(env, out):
            t.train()
    except PronghornError as e:
        print(f"pronghorn: error after {time.monotonic() - start:.1f}s: {e}", file=sys.stderr)
        exit_now(2)  # like the CLI: a normal exit can abort while the broken process group's threads run
    return 0


# ---------------------------------------------------------------- launching ----------------------------------
def _spawn(mode: str, out: Path, world: int = 2):
    return spawn(__file__, [mode, str(out)], world)


@pytest.mark.parametrize("n,world,batch", [(13, 2, 2), (5, 2, 2), (3, 4, 1), (1, 2, 3), (16, 3, 2)])
def test_every_rank_gets_a_share_and_the_same_number_of_micro_batches(n, world, batch):
    from pronghorn.train.distributed import FILLER, shard_examples

    shares = [shard_examples(list(range(n)), r, world, batch) for r in range(world)]
    assert [x for share in shares for x in share if x is not FILLER] == list(range(n))  # contiguous, each once
    assert len({-(-len(share) // batch) for share in shares}) == 1


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    for rc, log in _wait(_spawn("equivalence", out), timeout=240):
        assert rc == 0, log[-3000:]
    return out


@pytest.fixture(scope="module")
def one_rank_reference(tmp_path_factory):
    return _first_grads_and_curve(tmp_path_factory.mktemp("ref"), 4)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_equal_one_rank_with_twice_the_batch(two_rank_results, one_rank_reference, strategy):
    ref = one_rank_reference
    ranks = [torch.load(two_rank_results / f"{strategy}-rank{r}.pt", weights_only=True) for r in (0, 1)]
    for got in ranks:
        assert got["sharded"] == (strategy == "fsdp")
        assert got["tokens"] == ref["tokens"]
        assert got["loss"] == pytest.approx(ref["loss"], rel=1e-6)
        assert got["grads"].keys() == ref["grads"].keys()
        for name, g in ref["grads"].items():
            assert _close(got["grads"][name], g, 3e-6), name
        assert got["curve"] == pytest.approx(ref["curve"], rel=1e-5)
    for name, g in ranks[0]["grads"].items():  # the replicas hold the same averaged gradient, bit for bit
        assert torch.equal(g, ranks[1]["grads"][name]), name


def test_fsdp_full_finetuning_gradients_and_full_state(two_rank_results):
    ref = _full_finetune_grads(None)
    for r in (0, 1):
        got = torch.load(two_rank_results / f"full-rank{r}.pt", weights_only=True)
        for name, g in ref["grads"].items():
            assert _close(got["grads"][name], g, 3e-6), name
        if r == 0:  # the gathered full state dict is the unsharded model's
            assert got["state"].keys() == ref["state"].keys()
            assert all(torch.equal(got["state"][k], v) for k, v in ref["state"].items())
        else:
            assert got["state"] == {}


def _load_full(model, weights: dict):
    with torch.no_grad():
        for name, t in weights.items():
            owner, _, attr = name.rpartition(".")
            getattr(model.get_submodule(owner), attr).copy_(t)
    return model


def _same_safetensors(a: Path, b: Path) -> None:
    from safetensors.torch import load_file

    got, want = load_file(str(a)), load_file(str(b))
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k


def test_fsdp_full_finetuning_resumes_from_a_sharded_checkpoint(two_rank_results, tmp_path):
    from pronghorn.export.merged import save_merged

    full = two_rank_results / "full"
    ranks = [torch.load(two_rank_results / f"sharded-rank{r}.pt", weights_only=True) for r in (0, 1)]
    for got in ranks:  # interrupted after step 2, resumed: the same curve as the uninterrupted run, bit for bit
        assert got["kept"] == ["checkpoint-2", "checkpoint-3"]  # listed and pruned like adapter checkpoints
        assert got["resumed"] == got["first"] == ranks[0]["first"]
    assert not [p for p in full.iterdir() if p.name.startswith(".")], "a temporary directory is left"
    shards = sorted(p.name for p in (full / "checkpoint-3" / "sharded").iterdir())
    assert shards == [f"shard-0000{r}-model-00001-of-00001.safetensors" for r in (1, 2)]  # safetensors only
    # the final model (gathered from the shards by rank 0) is the trained model, as one process exports it
    save_merged(_load_full(tiny_full_model(), ranks[0]["weights"]), tmp_path / "ref", _Tokenizer())
    _same_safetensors(full / "model.safetensors", tmp_path / "ref" / "model.safetensors")
    assert (full / "config.json").read_text() == (tmp_path / "ref" / "config.json").read_text()
    # DCP reshards on load: one process resumes the 2-rank checkpoint (batch 4 == 2 ranks x 2)
    t = _trainer(tmp_path / "one", 4, tiny_full_model, max_steps=4,
                 resume_from_checkpoint=str(full / "checkpoint-3"))
    assert t.train().losses == pytest.approx(ranks[0]["first"][3:], rel=1e-5)


def test_qlora_nf4_base_under_fsdp_equals_one_rank_and_exports_like_one_process(two_rank_results, tmp_path):
    from pronghorn.export.adapter import save_adapter
    from pronghorn.export.save import save_pretrained_merged

    ref = _first_grads_and_curve(tmp_path / "ref", 4, tiny_qlora_model)
    ranks = [torch.load(two_rank_results / f"sharded-rank{r}.pt", weights_only=True)["qlora"] for r in (0, 1)]
    for got in ranks:
        assert got["sharded"] == fsdp_shards_integer_parameters()  # the packed NF4 bytes are FSDP shards
        assert got["norm_sharded"]  # the rest of the layer is, on every torch
        assert got["loss"] == pytest.approx(ref["loss"], rel=1e-6) and got["tokens"] == ref["tokens"]
        assert got["grads"].keys() == ref["grads"].keys()
        for name, g in ref["grads"].items():
            assert _close(got["grads"][name], g, 3e-6), name
        assert got["curve"] == pytest.approx(ref["curve"], rel=1e-5)
    trained = _load_full(tiny_qlora_model(), ranks[0]["weights"])
    assert any(bool(m.lora_B.abs().sum() > 0) for m in trained.modules() if getattr(m, "lora_B", None) is not None)
    save_adapter(trained, tmp_path / "adapter", base_model_name_or_path="tiny")
    _same_safetensors(two_rank_results / "qlora" / "adapter_model.safetensors",
                      tmp_path / "adapter" / "adapter_model.safetensors")
    with pytest.warns(UserWarning, match="dequantized 4-bit"):
        save_pretrained_merged(trained, tmp_path / "merged", _Tokenizer())
    _same_safetensors(two_rank_results / "qlora-merged" / "model.safetensors",
                      tmp_path / "merged" / "model.safetensors")


@pytest.mark.parametrize("mode", ["dies", "hangs"])
def test_a_failed_rank_ends_the_others_and_keeps_the_last_checkpoint(tmp_path, mode):
    from pronghorn.train.checkpoint import list_checkpoints, load_checkpoint

    procs = _spawn(mode, tmp_path)
    (rc0, log0), = _wait(procs[:1], timeout=180)
    if mode == "dies":
        (rc1, log1), = _wait(procs[1:], timeout=30)
        assert rc1 != 0 and "injected failure on rank 1" in log1
    else:
        assert procs[1].poll() is None  # still stuck in its 600 s sleep: end it
        procs[1].kill()
        procs[1].wait()
    assert rc0 == 2, log0[-3000:]
    assert "rank 0 of 2: lost contact with the other ranks" in log0
    assert f"the last complete checkpoint is {tmp_path / 'checkpoint-2'}" in log0
    seconds = float(re.search(r"error after ([0-9.]+)s", log0).group(1))  # from the start of training
    assert seconds < SHORT_TIMEOUT_S + 30, seconds  # the stuck rank sleeps 600 s: rank 0 did not wait for it
    found = list_checkpoints(tmp_path)
    assert [p.name for p in found] == ["checkpoint-1", "checkpoint-2"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "a half-written checkpoint is left"
    t = _trainer(tmp_path / "fresh", 2)
    assert load_checkpoint(found[-1], t.model, t.optimizer)["global_step"] == 2


# accelerate's --cpu runs ONE process (several CPU processes need its mpirun path); --multi_gpu starts one
# process per "GPU" through torch.distributed.run, which on a machine without GPUs pronghorn runs on gloo.
_LAUNCHERS = {
    "torchrun": ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port"],
    "accelerate": ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port"],
}


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_cli_train_under_a_launcher(tmp_path, smollm2_dir, launcher):
    if launcher == "accelerate":
        pytest.importorskip("accelerate")
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": f"Pronghorn fact {i}: it runs {'very ' * i}fast."}) + "\n"
                            for i in range(6)))
    out, recipe = tmp_path / "run", tmp_path / "recipe.yaml"
    recipe.write_text(f"model: {smollm2_dir}\ndata: {data}\nmax_steps: 2\nbatch_size: 1\n"
                      "gradient_accumulation_steps: 1\nr: 4\nmax_length: 32\nsave_steps: 1\ndtype: float32\n")
    # "--" ends torchrun's own options: its parser would take pronghorn's --r as an abbreviation of its --rdzv-*
    cmd = [sys.executable, *_LAUNCHERS[launcher], str(_free_port()), "-m", "pronghorn.cli", "--", "train",
           "--config", str(recipe), "--output-dir",
           str(out), "--no-progress", "--r", "4"]
    res = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]  # one writer
    assert (out / "adapter_model.safetensors").is_file() and (out / "checkpoint-1").is_dir()
    assert res.stdout.count("saved adapter to") == 1 and res.stdout.count("2 ranks (auto)") == 1


if __name__ == "__main__":
    from pronghorn.train.distributed import exit_now

    exit_now(_worker(sys.argv[1], Path(sys.argv[2])))  # as the CLI ends: teardown can abort (-6)
