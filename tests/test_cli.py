"""``pronghorn train | chat`` end to end on a tiny Llama checkpoint with the real SmolLM2 tokenizer (CPU, seconds)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import transformers

from pronghorn.cli import main

ROWS = [
    {"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                  {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]}
    for i in range(6)
]
FAST = ["--max-steps", "2", "--batch-size", "2", "--gradient-accumulation-steps", "1", "--max-length", "64",
        "--r", "4", "--no-progress", "--seed", "1"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smollm2_dir):
    """A 2-layer, hidden-48 Llama with SmolLM2's vocabulary and tokenizer, saved as a HF checkpoint dir."""
    tok = transformers.AutoTokenizer.from_pretrained(str(smollm2_dir))
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                   num_attention_heads=3, num_key_value_heads=1, max_position_embeddings=256,
                                   tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                                   eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    d = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(str(d))
    tok.save_pretrained(str(d))
    return d


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def _train(model_dir, data, out, *extra):
    return main(["train", "--model", str(model_dir), "--data", str(data), "--output-dir", str(out), *FAST, *extra])


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def trained(tiny_dir, tmp_path_factory):
    """One successful run shared by the tests that only need its output."""
    root = tmp_path_factory.mktemp("trained")
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    out = root / "out"
    assert _train(tiny_dir, data, out) == 0
    return tiny_dir, data, out


# ----------------------------------------------------------------------------------------------- train


def test_train_writes_adapter_metrics_and_plot(trained):
    tiny_dir, _, out = trained
    for name in ("adapter_config.json", "adapter_model.safetensors", "metrics.jsonl", "loss.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["base_model_name_or_path"] == str(tiny_dir)
    rows = _lines(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2] and all(r["loss"] > 0 for r in rows)
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_second_run_refuses_then_overwrite_replaces(trained, capsys):
    tiny_dir, data, out = trained
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    capsys.readouterr()
    assert _train(tiny_dir, data, out) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and str(out) in err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before

    assert _train(tiny_dir, data, out, "--overwrite", "--learning-rate", "1e-3") == 0
    assert "saved adapter" in capsys.readouterr().out
    assert (out / "adapter_model.safetensors").read_bytes() != before["adapter_model.safetensors"]
    assert len(_lines(out / "metrics.jsonl")) == 2  # replaced, not appended


def test_recipe_and_flag_override(tiny_dir, data, tmp_path):
    out = tmp_path / "from_recipe"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"model: {tiny_dir}\ndata: {data}\noutput_dir: {out}\nmax_steps: 1\nbatch_size: 2\n"
        "gradient_accumulation_steps: 1\nmax_length: 64\nr: 4\nlora_alpha: 8\nprogress: false\n"
        "target_modules: [q_proj, v_proj]\nlearning_rate: 1e-4\n"  # YAML 1.1 reads 1e-4 (no dot) as a string
    )
    assert main(["train", "--config", str(recipe), "--r", "2"]) == 0
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 2  # the flag wins
    assert cfg["lora_alpha"] == 8 and sorted(cfg["target_modules"]) == ["q_proj", "v_proj"]  # the recipe's
    rows = _lines(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1] and rows[0]["lr"] == pytest.approx(1e-4)


def test_raw_text_from_a_glob_with_a_held_out_split(tiny_dir, tmp_path, capsys):
    for i in range(3):
        (tmp_path / f"part{i}.txt").write_text(f"Document {i} starts here and runs on for a while.\n"
                                               f"Another document, number {i}b, follows it.\n")
    out = tmp_path / "out"
    assert main(["train", "--model", str(tiny_dir), "--data", str(tmp_path / "part*.txt"), "--output-dir", str(out),
                 *FAST, "--data-format", "raw_text", "--max-length", "16", "--eval-split", "0.34",
                 "--eval-steps", "1"]) == 0
    evals = [r for r in _lines(out / "metrics.jsonl") if "eval_loss" in r]
    assert [r["step"] for r in evals] == [1, 2] and all(r["eval_tokens"] > 0 for r in evals)
    assert f"held-out loss {evals[-1]['eval_loss']:.4f}" in capsys.readouterr().out


@pytest.mark.parametrize("line, fragment", [("batch_size: two", "integer"), ("progress: maybe", "true or false"),
                                            ("learning_rate: [1]", "number"), ("output_dir: null", "required")])
def test_recipe_wrong_type(tmp_path, capsys, line, fragment):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: default\n{line}\n")
    assert main(["train", "--config", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert str(recipe) in err and repr(line.split(":")[0]) in err and fragment in err


def test_recipe_unknown_key(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model: default\nlearning_rat: 0.001\n")
    assert main(["train", "--config", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "learning_rat" in err and str(recipe) in err
    assert not (tmp_path / "outputs").exists()


def test_recipe_missing_file(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert str(tmp_path / "nope.yaml") in capsys.readouterr().err


def test_invalid_setting_value(tmp_path, capsys, data):
    assert main(["train", "--data", str(data), "--output-dir", str(tmp_path / "o"), "--batch-size", "0"]) == 2
    assert "batch_size" in capsys.readouterr().err


# -------------------------------------------------------------------------------------------- bad data


def _bad_missing_field(path):
    rows = [ROWS[0], ROWS[1], {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant"}]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return ["line 3", "messages[1].content", "missing"]


def _bad_no_known_field(path):
    path.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps({"question": "q", "answer": "a"}) + "\n")
    return ["line 2", "'messages'"]


def _bad_empty(path):
    path.write_text("\n")
    return ["empty"]


def _bad_json(path):
    path.write_text(json.dumps(ROWS[0]) + "\n{not json\n")
    return ["line 2", "invalid JSON"]


@pytest.mark.parametrize("case", [_bad_missing_field, _bad_no_known_field, _bad_empty, _bad_json],
                         ids=["missing_field", "no_known_field", "empty", "invalid_json"])
def test_bad_data_exit_2(tiny_dir, tmp_path, capsys, case):
    path = tmp_path / "bad.jsonl"
    fragments = case(path)
    out = tmp_path / "out"
    assert _train(tiny_dir, path, out) == 2
    err = capsys.readouterr().err
    assert err.startswith("pronghorn: error: ") and str(path) in err
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in {err!r}"
    assert not (out / "adapter_model.safetensors").exists()


def test_bad_model_exit_2(data, tmp_path, capsys):
    missing = tmp_path / "no_model"
    assert _train(missing, data, tmp_path / "out") == 2
    assert str(missing) in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ eval

C4 = Path("/work/shared/data/llamafactory-demo/c4_demo.jsonl")


def _printed_eval(capsys) -> tuple[float, float, int]:
    line = capsys.readouterr().out.strip().splitlines()[-1]  # "loss L  perplexity P  (N predicted tokens)"
    words = line.replace("(", "").replace(")", "").replace(",", "").split()
    assert words[0] == "loss" and words[2] == "perplexity" and words[5:] == ["predicted", "tokens"], line
    return float(words[1]), float(words[3]), int(words[4])


def test_eval_prints_loss_and_perplexity_of_the_default_model(tmp_path, capsys):
    if not C4.is_file():
        pytest.skip(f"shared raw-text demo not found at {C4}")
    held = tmp_path / "held_out.jsonl"
    held.write_text("\n".join(C4.read_text().splitlines()[5:8]) + "\n")
    assert main(["eval", "--data", str(held), "--data-format", "raw_text", "--max-length", "64",
                 "--device", "cpu", "--dtype", "float32"]) == 0
    loss, perplexity, tokens = _printed_eval(capsys)
    assert tokens == 413 and 1.0 < loss < 10.0  # three documents; SmolLM2-Instruct on web text: ~4.5 nats
    assert abs(perplexity - math.exp(loss)) <= 1e-3 * perplexity


def test_eval_of_an_adapter_dir_equals_the_python_function(trained, capsys):
    from pronghorn import FastLanguageModel, evaluate_perplexity

    _, data, out = trained
    capsys.readouterr()
    assert main(["eval", "--model", str(out), "--data", str(data), "--max-length", "64", "--batch-size", "4"]) == 0
    loss, _, tokens = _printed_eval(capsys)
    model, tokenizer = FastLanguageModel.from_pretrained(str(out))
    expected = evaluate_perplexity(model, tokenizer, str(data), max_length=64, batch_size=4, progress=False)
    assert tokens == expected.tokens and loss == round(expected.loss, 4)


def test_eval_bad_row_exit_2(tiny_dir, tmp_path, capsys):
    path = tmp_path / "held.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"body": "no text"}) + "\n")
    assert main(["eval", "--model", str(tiny_dir), "--data", str(path), "--data-format", "raw_text"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pronghorn: error: ") and f"{path} line 2: field 'text': missing" in err


# ------------------------------------------------------------------------------------------------ chat


def test_chat_with_trained_adapter(trained, capsys):
    _, _, out = trained
    capsys.readouterr()
    assert main(["chat", "--model", str(out), "--prompt", "Hi", "--max-new-tokens", "5"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(">>> Hi\n")
    # the echo line and the streamer's final newline are 2 characters; the rest is the streamed reply
    # (this 2-step tiny model answers in newlines, so do not strip them)
    assert len(printed) > len(">>> Hi\n\n"), repr(printed)


def test_chat_bad_model(tmp_path, capsys):
    assert main(["chat", "--model", str(tmp_path / "nothing"), "--prompt", "Hi"]) == 2
    assert str(tmp_path / "nothing") in capsys.readouterr().err


# -------------------------------------------------------------------------------------------- explains itself


def _actions(parser):
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from ((f"{name} {flag}", a) for flag, a in _actions(sub))
        elif not isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            yield action.option_strings[0], action


def test_every_flag_has_a_description_a_default_and_its_choices():
    from pronghorn.cli import build_parser
    from pronghorn.train.settings import SETTINGS

    flags = dict(_actions(build_parser()))
    assert "train --load-in-4bit" in flags and "train --learning-rate" in flags
    for name, action in flags.items():
        assert action.help and ("default" in action.help or action.required), name
    for setting, rule in SETTINGS.items():
        action = flags[f"train --{setting.replace('_', '-')}"]
        if rule.choices:
            assert action.metavar == "{" + ",".join(rule.choices) + "}", setting
        if rule.low is not None:
            assert rule.describe() in action.help, setting


def test_version_and_python_m(capsys):
    import subprocess
    import sys

    import pronghorn

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"pronghorn {pronghorn.__version__}"
    run = subprocess.run([sys.executable, "-m", "pronghorn", "train", "--help"], capture_output=True, text=True,
                         cwd=Path(pronghorn.__file__).parents[1], timeout=120)
    assert run.returncode == 0 and "--load-in-4bit" in run.stdout and "peak learning rate" in run.stdout


def test_sft_on_preference_rows_suggests_the_dpo_method(tiny_dir, tmp_path, capsys):
    pref = tmp_path / "pref.jsonl"
    pref.write_text(json.dumps({"prompt": "Q?", "chosen": "Yes.", "rejected": "No."}) + "\n")
    argv = ["train", "--model", str(tiny_dir), "--data", str(pref), "--output-dir", str(tmp_path / "o"), *FAST]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "pref.jsonl line 1" in err and "method='dpo' (CLI: --method dpo)" in err


@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_load_in_4bit_reaches_the_loader(tmp_path, capsys, monkeypatch, data, method):
    import importlib

    seen = {}

    def loader(name, *args, load_in_4bit=False, **kw):
        seen["load_in_4bit"] = load_in_4bit
        raise SystemExit(0)  # stop before anything slow

    module = importlib.import_module("pronghorn.train.run")
    monkeypatch.setattr(module, "load_pretrained", loader)
    pref = tmp_path / "pref.jsonl"
    pref.write_text(json.dumps({"prompt": "Q?", "chosen": "Yes.", "rejected": "No."}) + "\n")
    rows = str(data if method == "sft" else pref)
    with pytest.raises(SystemExit):
        main(["train", "--load-in-4bit", "--method", method, "--data", rows, "--output-dir", str(tmp_path / "o")])
    assert seen == {"load_in_4bit": True}
