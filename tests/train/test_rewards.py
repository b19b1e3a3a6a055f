"""The gsm8k rewards on real gsm8k rows (openai/grade-school-math, ../shared/data): a reference solution has the
format and the right number; changes to either are caught. Reward name resolution: built-ins, import paths."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pronghorn.data.prompts import GSM8K_SYSTEM_PROMPT, prompt_rows
from pronghorn.errors import PronghornError
from pronghorn.train.rewards import gsm8k_correct, gsm8k_format, gsm8k_format_partial, resolve_reward

GSM8K = Path("/work/shared/data/gsm8k/test.jsonl")


@pytest.fixture(scope="module")
def gsm8k():
    if not GSM8K.is_file():
        pytest.skip(f"shared datasets not found at {GSM8K.parent}")
    return [json.loads(line) for line in GSM8K.read_text().splitlines()[:40]]


def test_reference_solutions_score_full_marks(gsm8k, smollm2_tokenizer):
    rows = prompt_rows(gsm8k, smollm2_tokenizer)
    assert rows[0]["prompt"][0] == {"role": "system", "content": GSM8K_SYSTEM_PROMPT}
    assert rows[0]["prompt"][1]["content"] == gsm8k[0]["question"]
    assert rows[0]["answer"] == gsm8k[0]["answer"].split("####")[-1].strip().replace(",", "")
    text = smollm2_tokenizer.decode(rows[0]["prompt_ids"])
    assert text.endswith("<|im_start|>assistant\n") and GSM8K_SYSTEM_PROMPT in text  # rendered for generation
    solutions = [r["solution"] for r in rows]
    answers = [r["answer"] for r in rows]
    prompts = [r["prompt"] for r in rows]
    assert gsm8k_format(prompts, solutions) == [1.0] * len(rows)
    assert gsm8k_correct(prompts, solutions, answer=answers) == [1.0] * len(rows)
    as_chat = [[{"role": "assistant", "content": s}] for s in solutions]  # conversational completions too
    assert gsm8k_correct(prompts, as_chat, answer=answers) == [1.0] * len(rows)


def test_wrong_numbers_and_missing_format_score_zero(gsm8k):
    answers = [r["answer"].split("####")[-1].strip() for r in gsm8k[:10]]
    wrong = [r["answer"].rsplit("####", 1)[0] + f"#### {float(a.replace(',', '')) + 1:g}" for r, a in
             zip(gsm8k[:10], answers)]
    assert gsm8k_correct([None] * 10, wrong, answer=answers) == [0.0] * 10
    assert gsm8k_format([None] * 10, wrong) == [1.0] * 10  # still well formed
    bare = [r["answer"].rsplit("####", 1)[0].strip() for r in gsm8k[:10]]
    assert gsm8k_format([None] * 10, bare) == [0.0] * 10
    assert gsm8k_correct([None] * 10, bare, answer=answers) == [0.0] * 10
    only_answer = [f"#### {a}" for a in answers]  # no reasoning before it
    assert gsm8k_format([None] * 10, only_answer) == [0.0] * 10
    assert gsm8k_correct([None] * 10, only_answer, answer=answers) == [1.0] * 10
    trailing = [r["answer"] + "\nI hope this helps." for r in gsm8k[:10]]  # the answer line must be last
    assert gsm8k_format([None] * 10, trailing) == [0.0] * 10
    assert gsm8k_correct([None], ["so\n#### 1,234.0"], answer=["1234"]) == [1.0]  # compared as numbers


def test_partial_format_credits_the_answer_line_anywhere(gsm8k):
    full = [r["answer"] for r in gsm8k[:5]]
    answers = [r["answer"].split("####")[-1].strip() for r in gsm8k[:5]]
    trailing = [s + "\nI hope this helps." for s in full]  # answer line present, not last
    only_answer = [f"#### {a}" for a in answers]  # no reasoning before it
    bare = [s.rsplit("####", 1)[0].strip() for s in full]
    inline = [s.rsplit("####", 1)[0] + "so the answer is #### 5" for s in full]  # not on its own line
    got = gsm8k_format_partial([None] * 20, full + trailing + only_answer + bare)
    assert got == [1.0] * 5 + [0.5] * 10 + [0.0] * 5
    assert gsm8k_format_partial([None] * 5, inline) == [0.0] * 5
    assert gsm8k_format_partial([None], [[{"role": "assistant", "content": trailing[0]}]]) == [0.5]


def test_reward_names_resolve_and_bad_ones_are_named():
    assert resolve_reward("gsm8k_format") is gsm8k_format
    assert resolve_reward("gsm8k_format_partial") is gsm8k_format_partial
    assert resolve_reward("pronghorn.train.rewards:gsm8k_correct") is gsm8k_correct
    with pytest.raises(PronghornError, match="cannot import 'pronghorn.train.rewards:nothing'"):
        resolve_reward("pronghorn.train.rewards:nothing")
    with pytest.raises(PronghornError, match="unknown reward 'gsm8k'"):
        resolve_reward("gsm8k")
