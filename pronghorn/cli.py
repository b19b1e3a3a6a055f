"""``pronghorn`` (or ``python -m pronghorn``) command line: train | plan | eval | chat | export | demo. Thin: parses
arguments and calls the Python API."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing

from .errors import LostPeersError, PronghornError
from . import __version__
from .train.config import TrainConfig
from .train.settings import SETTINGS


def _add_train_args(p: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field, described by train/settings.py (help, default, choices or range)."""
    p.add_argument("--config", help="YAML recipe whose keys are the settings below; flags override it (default: none)")
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag, rule = "--" + f.name.replace("_", "-"), SETTINGS[f.name]
        kind = hints[f.name]
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        allowed = f"; {rule.describe()}" if rule.choices or rule.low is not None else ""
        text = f"{rule.help} (default: {default}{allowed})".replace("%", "%%")
        metavar = "{" + ",".join(rule.choices) + "}" if rule.choices else None
        if kind is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif f.name == "gradient_checkpointing":  # a bare flag means "on"; also auto | off | offload | unsloth
            p.add_argument(flag, nargs="?", const="on", default=None, help=text, metavar="{auto,on,off,offload}")
        else:
            optional = typing.get_origin(kind) in (typing.Union, types.UnionType)  # X | None -> X
            args = [a for a in typing.get_args(kind) if a is not type(None)] if optional else [kind]
            if typing.get_origin(args[0]) is list:  # target_modules, reward_funcs, reward_weights, stop_strings
                item = typing.get_args(args[0])[0]
                p.add_argument(flag, nargs="+", type=item if item in (int, float) else str, default=None, help=text,
                               metavar="VALUE" if item in (int, float) else "NAME")
                continue
            p.add_argument(flag, type=args[0] if args[0] in (int, float) else str, default=None, help=text,
                           metavar=metavar)


def _train_config(args: argparse.Namespace) -> TrainConfig:
    """The recipe (``--config``) with the flags given over it."""
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    if args.config:
        return TrainConfig.from_yaml(args.config, **overrides)
    return TrainConfig(**{k: v for k, v in overrides.items() if v is not None})


def _train(args: argparse.Namespace) -> int:
    from .train.run import train

    cfg = _train_config(args)
    res = train(cfg)
    from .train.distributed import env_from_os

    if env_from_os().is_main:  # under torchrun: one report, from rank 0
        print(f"saved {'model' if cfg.full_finetuning else 'adapter'} to {res.output_dir} after {res.global_step} steps "
              f"(final loss {res.losses[-1]:.4f}); metrics: {res.metrics_file}; plot: {res.loss_plot}")
        if res.eval_metrics:
            print(f"held-out loss {res.eval_metrics['eval_loss']:.4f}  perplexity "
                  f"{res.eval_metrics['eval_perplexity']:.4f} after step {res.eval_metrics['step']}")
    return 0


# cards' memory in GB, and the budget each leaves a process, in GiB (its size less the CUDA context and a margin)
CARD_BUDGETS = ((8, 7.5), (12, 11.5), (16, 15.5), (24, 23.5), (40, 39.5), (80, 79))


def _plan(args: argparse.Namespace) -> int:
    """The memory plan of the training step a recipe and flags describe, without a GPU or the weights."""
    from .models.lora import LoRAConfig
    from .models.plan_preview import read_config, preview_plan

    cfg = _train_config(args)
    if cfg.method != "sft" or cfg.full_finetuning:
        raise PronghornError("pronghorn plan previews LoRA and QLoRA SFT steps; this recipe is "
                             + ("full fine-tuning" if cfg.full_finetuning else f"method {cfg.method!r}"))
    model_cfg = read_config(cfg.model)
    lora = LoRAConfig(r=cfg.r, lora_alpha=cfg.lora_alpha, target_modules=list(cfg.target_modules),
                      use_rslora=cfg.use_rslora)
    what = (f"{cfg.model} ({model_cfg.model_type}, {model_cfg.num_hidden_layers} layers), "
            f"{'QLoRA' if cfg.load_in_4bit else 'LoRA'} r={cfg.r}, batch {cfg.batch_size} x {cfg.max_length} tokens")

    def plan(budget):
        return preview_plan(model_cfg, cfg.batch_size, cfg.max_length, budget, lora, cfg.load_in_4bit,
                            cfg.gradient_checkpointing, tiled_mlp=cfg.tiled_mlp, mlp_chunk=cfg.tiled_mlp_chunk)

    print(f"memory plan for {what} on a CUDA GPU:\n  {plan(cfg.max_memory).summary()}")
    if cfg.max_memory is None:  # what common cards' memory would get
        print("with --max-memory set to what a card leaves the process:")
        for card, gib in CARD_BUDGETS:
            try:
                fits = plan(f"{gib}GiB").summary().split("; estimated peak")[0]
            except PronghornError as e:
                fits = "does not fit: " + str(e).split(". ", 1)[-1].split(", or")[0]
            print(f"  {card:>2} GB card, {gib:>4} GiB: {fits}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    import torch

    from .api import FastLanguageModel
    from .train.evaluate import evaluate_perplexity

    dtype = getattr(torch, args.dtype) if args.dtype else None
    model, tokenizer = FastLanguageModel.from_pretrained(args.model, dtype=dtype, device=args.device)
    try:
        result = evaluate_perplexity(model, tokenizer, args.data, args.max_length, args.batch_size,
                                     data_format=args.data_format, sample_by=args.sample_by, train_on=args.train_on,
                                     overlong=args.overlong, progress=True)
    except ValueError as e:  # a bad --data-format, --max-length or --batch-size
        raise PronghornError(str(e)) from None
    print(f"loss {result.loss:.4f}  perplexity {result.perplexity:.4f}  ({result.tokens:,} predicted tokens)")
    return 0


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    """The data flags say what ``train``'s do (train/settings.py), with evaluation's defaults."""
    p.add_argument("--model", default="default",
                   help="checkpoint dir, adapter dir, .gguf file, hub id or 'default' (default: %(default)s)")
    p.add_argument("--data", required=True, help="held-out data: a .jsonl/.json/.txt/.csv/.parquet file, folder or "
                                                 "glob pattern (required)")
    for name, default, kind in (("data_format", None, str), ("sample_by", "line", str), ("max_length", 2048, int),
                                ("train_on", "all_assistant", str), ("overlong", "truncate", str)):
        rule = SETTINGS[name]
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=default, choices=rule.choices or None,
                       help=f"{rule.help} (default: {default})".replace("%", "%%"))
    p.add_argument("--batch-size", type=int, default=8, help="rows per forward (default: %(default)s)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="compute dtype (default: bfloat16 on a GPU, float32 on the CPU)")
    p.add_argument("--device", help="cpu, cuda, cuda:N (default: a GPU when there is one)")


def _answer(model, tokenizer, messages: list[dict], max_new_tokens: int, temperature: float, stream: bool) -> str:
    from .infer.streaming import TerminalStreamer

    enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    enc = {k: v.to(model.device) for k, v in enc.items()}
    streamer = TerminalStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                         temperature=temperature or 1.0, streamer=streamer, tokenizer=tokenizer)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def _chat(args: argparse.Namespace) -> int:
    from .api import FastLanguageModel

    model, tokenizer = FastLanguageModel.from_pretrained(args.model)
    FastLanguageModel.for_inference(model)
    history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    scripted = iter(args.prompt) if args.prompt else None  # --prompt turns: one conversation, then exit
    if scripted is None:
        print("pronghorn chat: type a message; /reset clears the history, /exit (or Ctrl-D) quits.")
    while True:
        if scripted is not None:
            line = next(scripted, None)
            if line is None:
                return 0
            print(f">>> {line}")
        else:
            try:
                line = input(">>> ").strip()
            except EOFError:
                print()
                return 0
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            history = history[:1] if args.system else []
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        reply = _answer(model, tokenizer, history, args.max_new_tokens, args.temperature, stream=True)
        history.append({"role": "assistant", "content": reply})


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(output_dir=args.output_dir, overwrite=args.overwrite, epochs=args.epochs)
    return 0


def _export(args: argparse.Namespace) -> int:
    from .export.command import export

    paths = export(args.model, args.out, args.format, adapter=args.adapter, quant=args.quant,
                   overwrite=args.overwrite, base_checkpoint=args.base_checkpoint, max_shard_size=args.max_shard_size,
                   dtype=args.dtype)
    for path in paths:
        print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pronghorn", description="Fast, exact LoRA fine-tuning of Llama-family models")
    parser.add_argument("--version", action="version", version=f"pronghorn {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="fine-tune with LoRA (flags or a YAML recipe)")
    _add_train_args(t)
    t.set_defaults(func=_train)
    pl = sub.add_parser("plan", help="the memory plan of a training step (what fits --max-memory, and how) "
                                     "without a GPU or the weights")
    _add_train_args(pl)
    pl.set_defaults(func=_plan)
    v = sub.add_parser("eval", help="held-out loss and perplexity of a model or a trained adapter on a dataset")
    _add_eval_args(v)
    v.set_defaults(func=_eval)
    c = sub.add_parser("chat", help="chat with a model or a trained adapter directory (streams the reply)")
    c.add_argument("--model", default="default",
                   help="checkpoint dir, adapter dir, .gguf file, hub id or 'default' (default: %(default)s)")
    c.add_argument("--prompt", action="append",
                   help="a user turn; repeat for a multi-turn conversation (history kept), then exit "
                        "(default: interactive)")
    c.add_argument("--system", help="system prompt (default: none)")
    c.add_argument("--max-new-tokens", type=int, default=256, help="reply length cap in tokens (default: %(default)s)")
    c.add_argument("--temperature", type=float, default=0.0,
                   help="sampling temperature, 0 = greedy (default: %(default)s)")
    c.set_defaults(func=_chat)
    d = sub.add_parser("demo", help="fine-tune the default model on the embedded persona set; show before/after")
    d.add_argument("--output-dir", default="outputs/demo", help="where the demo's adapter goes (default: %(default)s)")
    d.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=True,
                   help="replace an earlier demo's output (default: %(default)s)")
    d.add_argument("--epochs", type=float, default=3.0, help="passes over the persona set (default: %(default)s)")
    d.set_defaults(func=_demo)
    e = sub.add_parser("export", help="write a merged HF checkpoint, GGUF files (+ Ollama Modelfile) or a PEFT adapter")
    e.add_argument("--model", default="default",
                   help="checkpoint dir, adapter dir, .gguf file, hub id or 'default' (default: %(default)s)")
    e.add_argument("--adapter", help="PEFT adapter dir to apply to --model, checked against its names and shapes "
                                     "(default: none)")
    e.add_argument("--format", choices=("merged", "gguf", "lora"), default="merged",
                   help="merged HF safetensors, GGUF (+ Ollama Modelfile) or a PEFT adapter (default: %(default)s)")
    e.add_argument("--quant", nargs="+",
                   help="GGUF methods, one file each: f16 bf16 f32 q8_0 q5_0 q4_0 q6_k q4_k q4_k_m (default: f16)")
    e.add_argument("--out", required=True, help="directory to create, required (must be empty unless --overwrite)")
    e.add_argument("--overwrite", action="store_true", help="replace an existing --out (default: refuse)")
    e.add_argument("--base-checkpoint", help="merge into this 16-bit checkpoint's weights, for a 4-bit base "
                                             "(default: none)")
    e.add_argument("--max-shard-size",  # no argparse default: given with another --format it is an error
                   help="merged safetensors shard size, e.g. 5GB, 500MB (default: 5GB)")
    e.add_argument("--dtype", choices=("bfloat16", "float16", "float32"),
                   help="merged weights' dtype (default: bfloat16; float32 keeps a small fine-tune exactly, and "
                        "export warns when bf16 rounding would undo more than 10%% of the adapter's effect)")
    e.set_defaults(func=_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
        from .train.distributed import env_from_os, exit_now

        if env_from_os().distributed:  # a rank of a torchrun job: skip the interpreter's teardown, whose
            exit_now(code)  # destruction of the process group's threads can abort (-6) a run that succeeded
        return code
    except PronghornError as e:
        print(f"pronghorn: error: {e}", file=sys.stderr)
        if isinstance(e, LostPeersError):
            from .train.distributed import exit_now

            exit_now(2)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
