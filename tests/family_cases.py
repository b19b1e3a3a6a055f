"""Checks a model family's tiny configs pass against transformers' own modeling code (fp32, at the Llama tests'
tolerances), beside tests/models/test_decoder_vs_hf.py (logits and loss with left and right padding, every
TINY_CONFIGS entry) and test_lora_vs_peft.py (LoRA gradients): long unpadded rows, packed (padding-free) rows and
KV-cache generation. tests/models/families/test_<family>.py run them."""

from __future__ import annotations

import torch

from helpers import make_pair, random_examples
from pronghorn.data.packing import collate_packed, pack_examples

RTOL = 1e-5  # fp32: relative to the largest logit (tests/models/test_decoder_vs_hf.py)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def check_long_unpadded(name: str, length: int = 40) -> None:
    """Past every sliding window (and, for longrope, past the original context)."""
    hf, ours = make_pair(name)
    ids = torch.randint(3, 97, (2, length), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert rel(ours(input_ids=ids).logits, hf(input_ids=ids).logits) <= RTOL


def check_packed_rows(name: str) -> None:
    """A padding-free packed batch gives each sequence the logits transformers gives it alone."""
    hf, ours = make_pair(name)
    examples = random_examples(n=8, seed=5)
    rows = pack_examples(examples, max_length=48)
    assert len(rows) < len(examples)
    batch = collate_packed(rows, pad_token_id=0)
    with torch.no_grad():
        logits = ours(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        seen = 0
        for b, row in enumerate(rows):
            pos = row["position_ids"]
            starts = [t for t in range(len(pos)) if pos[t] == 0] + [len(pos)]
            for s, e in zip(starts, starts[1:]):
                ref = hf(input_ids=torch.tensor([row["input_ids"][s:e]])).logits[0]
                assert rel(logits[b, s:e], ref) <= RTOL
                seen += 1
    assert seen == len(examples)


def check_generation_with_cache(name: str, new_tokens: int = 8) -> None:
    """Greedy decoding through the KV cache picks transformers' tokens (left-padded batch)."""
    from pronghorn.infer.generate import generate

    hf, ours = make_pair(name)
    ids = torch.randint(3, 97, (2, 7), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    ids[1, :3] = 0
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                          pad_token_id=0)[:, ids.shape[1]:]
    got = generate(ours, ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, eos_token_id=[])
    assert torch.equal(got[:, -new_tokens:], ref)
