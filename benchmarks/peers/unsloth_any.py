"""Peer: Unsloth LoRA / QLoRA on any family's checkpoint dir (Gemma 2: Unsloth's own Gemma 2 model; Phi-3 and
Gemma 3 text: its generic ``FastModel`` path, which ``FastLanguageModel`` delegates to), the measurement of
../shared/bench's unsloth_bench.py: ``use_gradient_checkpointing="unsloth"``, the rest as ``hf_any.measure``.

    python benchmarks/peers/unsloth_any.py --dir /tmp/models/phi-3.5-mini --bs 4 --seq 2048
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
import torch  # noqa: E402
from unsloth import FastLanguageModel  # noqa: E402  (first: it patches transformers when imported)

from hf_any import lora_targets, measure, parse_args  # noqa: E402  (this script's folder is on sys.path)


def main():
    a = parse_args()
    try:
        model, _ = FastLanguageModel.from_pretrained(model_name=a.dir, max_seq_length=a.seq, dtype=torch.bfloat16,
                                                     load_in_4bit=bool(a.q4))
    except Exception as e:
        print("LOAD_FAIL", type(e).__name__, str(e)[:2000], flush=True)
        raise
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, lora_dropout=0, bias="none",
                                             target_modules=lora_targets(a.config["model_type"]),
                                             use_gradient_checkpointing="unsloth", random_state=3407,
                                             max_seq_length=a.seq)
    measure(model, a, "unsloth")


if __name__ == "__main__":
    main()
