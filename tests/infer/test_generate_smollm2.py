"""Generation on the real SmolLM2-135M-Instruct with its tokenizer and chat template: the static decode loop,
the eager loop and transformers agree on left-padded chat batches, and transformers' TextStreamer streams."""

import pytest
import torch
import transformers

from pronghorn.api import FastLanguageModel

QUESTIONS = ["What is the capital of France?", "Write a haiku about rain on a tin roof, please.", "Hi"]


@pytest.fixture(scope="module")
def models(smollm2_dir, smollm2_fp32):
    ours, tok = smollm2_fp32
    FastLanguageModel.for_inference(ours)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32,
                                                           attn_implementation="sdpa").eval()
    tok.padding_side = "left"
    return ours, hf, tok


def _chat_batch(tok):
    texts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
             for q in QUESTIONS]
    return tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)


def _logits_hook(model, seen):
    return model.register_forward_hook(lambda m, a, k, out: seen.append(out.logits[:, -1].clone()), with_kwargs=True)


def test_left_padded_chat_batch_static_eager_and_transformers_agree(models):
    ours, hf, tok = models
    enc = _chat_batch(tok)
    assert len(set(enc["attention_mask"].sum(-1).tolist())) == 3  # three prompt lengths, two rows padded
    kw = dict(max_new_tokens=10, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    out, seen = {}, {}
    for mode in ("eager", "static"):
        seen[mode] = []
        hook = _logits_hook(ours, seen[mode])
        try:
            out[mode] = ours.generate(**enc, decode_mode=mode, **kw)
        finally:
            hook.remove()
    ref = hf.generate(**enc, do_sample=False, **kw)
    assert torch.equal(out["eager"], ref) and torch.equal(out["static"], ref)
    assert len(seen["static"]) == len(seen["eager"])
    for a, b in zip(seen["static"], seen["eager"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)  # fp32 logits of magnitude ~10-30
    # the most padded row says what it says alone
    alone = {k: v[2:, enc["attention_mask"][2].bool()] for k, v in enc.items()}
    row = ours.generate(**alone, decode_mode="static", **kw)[0, alone["input_ids"].shape[1]:]
    assert torch.equal(row, out["static"][2, enc["input_ids"].shape[1]:][:row.shape[0]])


def test_text_streamer_prints_the_completion(models, capsys):
    ours, _, tok = models
    enc = tok.apply_chat_template([{"role": "user", "content": QUESTIONS[0]}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    streamer = transformers.TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    out = ours.generate(**enc, max_new_tokens=8, streamer=streamer, decode_mode="static")
    printed = capsys.readouterr().out
    text = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert text.strip() and printed.strip() == text.strip()
