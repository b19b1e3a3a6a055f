"""Multi-GPU LoRA training: DDP scaling from 1 to N GPUs, and FSDP2 under a per-GPU memory cap.

The workload of ../shared/bench/README.md (Llama-3.1-8B config, random weights, bf16, LoRA r=16 alpha=16 on
q,k,v,o,gate,up,down, random token ids, labels = input ids, AdamW, gradient checkpointing, batch 2 x 2048 per
GPU), trained through pronghorn's own Trainer (sharding, global token normalisation, DDP/FSDP hooks).
Each configuration runs under ``torchrun``; this script launches them and prints a table:

1. DDP on 1 GPU and on N GPUs: tok/s (all GPUs together, median of steps 3..) and the scaling factor.
2. FSDP2 on N GPUs with ``torch.cuda.set_per_process_memory_fraction`` capping each GPU below the model's bf16
   weights: it trains, and its per-step loss matches the uncapped DDP run on the same model and data.

    python benchmarks/multi_gpu.py --gpus 2 --json multi_gpu.json      # 2 GPUs, 8B config, cap 14 GiB
    python benchmarks/multi_gpu.py --smoke                              # tiny model, 2 CPU processes, gloo
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0,
                max_position_embeddings=131072)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=256, tie_word_embeddings=False, rope_theta=10000.0, max_position_embeddings=512)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class _Tokenizer:
    pad_token_id, eos_token_id = 0, 1

    def save_pretrained(self, path):
        pass


def _fill_(p: torch.Tensor, name: str, pool: torch.Tensor) -> None:
    """Deterministic pseudo-random weights at memcpy speed: the pool tiled from a per-name offset."""
    if name.endswith("norm.weight"):
        p.fill_(1.0)
        return
    n, offset = p.numel(), zlib.crc32(name.encode()) % pool.numel()
    tiled = pool.roll(-offset).repeat(-(-n // pool.numel()))[:n]
    p.copy_(tiled.view_as(p))


def build_model(cfg: dict, dtype: torch.dtype):
    """Random base weights (identical in every process and run) + fresh LoRA adapters, on the CPU."""
    from pronghorn.models.config import ModelConfig
    from pronghorn.models.decoder import DecoderForCausalLM
    from pronghorn.models.lora import LoRAConfig, attach_lora

    config = ModelConfig.from_hf_dict({"model_type": "llama", "hidden_act": "silu", "rms_norm_eps": 1e-5, **cfg})
    with torch.device("meta"):
        model = DecoderForCausalLM(config, dtype=dtype)
    model.to_empty(device="cpu")
    pool = (torch.randn(2**20 + 7, generator=torch.Generator().manual_seed(0)) * 0.02).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            _fill_(p, name, pool)
    model.tie_weights()
    attach_lora(model, LoRAConfig(r=16, lora_alpha=16, target_modules=TARGETS), seed=0)
    return model


def worker(args) -> None:
    """One rank: build, wrap (inside Trainer), train ``--steps`` steps, rank 0 writes the JSON."""
    from pronghorn.train.config import TrainConfig
    from pronghorn.train.distributed import init_distributed
    from pronghorn.train.trainer import Trainer

    env = init_distributed(600.0)
    cuda = torch.cuda.is_available()
    if cuda and args.cap_gib:
        total = torch.cuda.get_device_properties(env.local_rank).total_memory
        torch.cuda.set_per_process_memory_fraction(args.cap_gib * 2**30 / total, env.local_rank)
    cfg = TINY if args.smoke else LLAMA_8B
    dtype = torch.bfloat16 if cuda else torch.float32
    model = build_model(cfg, dtype)
    weights_gib = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "lora_" not in n) / 2**30
    if not env.distributed and cuda:
        model.to(env.device)
    model.gradient_checkpointing_enable()
    model.train()
    g = torch.Generator().manual_seed(1)
    n = args.steps * args.batch * env.world_size
    examples = [{"input_ids": ids, "labels": ids}
                for ids in torch.randint(2, cfg["vocab_size"], (n, args.seq), generator=g).tolist()]
    out = tempfile.mkdtemp(prefix="pronghorn-multigpu-")
    tc = TrainConfig(output_dir=out, overwrite=True, progress=False, batch_size=args.batch,
                     gradient_accumulation_steps=1, max_steps=args.steps, learning_rate=1e-4,
                     lr_scheduler="constant", distributed=args.strategy)
    trainer = Trainer(model, _Tokenizer(), examples, tc)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for step in range(args.steps):
        t0 = time.perf_counter()
        loss, _, tokens = trainer.train_step(trainer.step_examples(step))
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(loss)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    peaks = [peak] * env.world_size
    if env.distributed:
        import torch.distributed as dist

        dist.all_gather_object(peaks, peak)
    step_s = statistics.median(times[2:] or times)
    if env.is_main:
        Path(args.out).write_text(json.dumps({
            "strategy": trainer.dist.strategy, "gpus": env.world_size, "device": str(env.device),
            "gpu_name": torch.cuda.get_device_name(env.local_rank) if cuda else "cpu",
            "batch_per_gpu": args.batch, "seq": args.seq, "step_s": step_s,
            "tok_s": args.batch * args.seq * env.world_size / step_s, "losses": losses,
            "peak_gib_per_gpu": peaks, "cap_gib": args.cap_gib if cuda else None, "base_weights_gib": weights_gib,
        }, indent=2))
    if env.distributed:
        import torch.distributed as dist

        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(nproc: int, strategy: str, args, cap_gib: float | None = None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
               str(_free_port()), __file__, "--worker", "--strategy", strategy, "--out", str(out),
               "--steps", str(args.steps), "--batch", str(args.batch), "--seq", str(args.seq)]
        cmd += ["--cap-gib", str(cap_gib or 0)]
        cmd += ["--smoke"] if args.smoke else []
        env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        if args.smoke:
            env["OMP_NUM_THREADS"] = "1"
        if cap_gib:  # under the cap, fixed-size segments strand ~1.8 GiB (measured on 2 x H200: OOM at 12.1 GiB used)
            env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
        print(f"$ torchrun --nproc_per_node {nproc} ... --strategy {strategy}"
              + (f" --cap-gib {cap_gib}" if cap_gib else ""), flush=True)
        res = subprocess.run(cmd, cwd=ROOT, env=env)
        if res.returncode != 0:
            hint = " (out of memory under the cap? try a larger --cap-gib)" if cap_gib else ""
            raise SystemExit(f"the {strategy} run on {nproc} process(es) failed (exit {res.returncode}){hint}")
        return json.loads(out.read_text())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", type=int, default=2)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch", type=int, default=2, help="sequences per GPU per step")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--cap-gib", type=float, default=14.0,
                   help="per-GPU memory cap for the FSDP2 run (the 8B config's bf16 weights are 14.96 GiB)")
    p.add_argument("--smoke", action="store_true", help="tiny model on CPU processes (gloo)")
    p.add_argument("--json", help="write all results here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--strategy", default="ddp", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.batch, args.seq, args.gpus = min(args.steps, 4), 2, 32, 2
    if args.worker:
        worker(args)
        return 0
    one = launch(1, "ddp", args)
    ddp = launch(args.gpus, "ddp", args)
    fsdp = launch(args.gpus, "fsdp", args, None if args.smoke else args.cap_gib)
    diff = max(abs(a - b) / abs(b) for a, b in zip(fsdp["losses"], ddp["losses"]))
    print(f"\n{'run':<34}{'tok/s':>10}{'step s':>9}{'peak GiB/GPU':>14}")
    for name, r in (("DDP, 1 process", one), (f"DDP, {args.gpus} processes", ddp),
                    (f"FSDP2, {args.gpus} processes, cap {fsdp['cap_gib'] or '-'} GiB", fsdp)):
        print(f"{name:<34}{r['tok_s']:>10,.0f}{r['step_s']:>9.3f}{max(r['peak_gib_per_gpu']):>14.2f}")
    scaling = ddp["tok_s"] / one["tok_s"]
    print(f"\nDDP scaling {args.gpus} vs 1: {scaling:.3f}x (ideal {args.gpus}); base weights "
          f"{fsdp['base_weights_gib']:.2f} GiB vs FSDP cap {fsdp['cap_gib']} GiB per GPU")
    print(f"FSDP2 vs DDP loss, max relative difference over {len(ddp['losses'])} steps: {diff:.2e}")
    print("losses DDP :", " ".join(f"{x:.5f}" for x in ddp["losses"]))
    print("losses FSDP:", " ".join(f"{x:.5f}" for x in fsdp["losses"]))
    capped = fsdp["cap_gib"] is not None and fsdp["base_weights_gib"] > fsdp["cap_gib"]
    verdict = {"ddp_scaling_ge_1.85": scaling >= 1.85,
               "fsdp_base_exceeds_cap_and_trained": capped and max(fsdp["peak_gib_per_gpu"]) <= fsdp["cap_gib"],
               "fsdp_loss_matches_ddp_1e-2": diff <= 1e-2}  # bf16: reduction order differs between the two
    print("acceptance:", ", ".join(f"{k}={'yes' if v else 'NO'}" for k, v in verdict.items()))
    if args.json:
        Path(args.json).write_text(json.dumps({
            "torch": torch.__version__, "ddp_1": one, "ddp_n": ddp, "fsdp_n": fsdp, "scaling": scaling,
            "fsdp_vs_ddp_max_rel_loss_diff": diff, "acceptance": verdict}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
