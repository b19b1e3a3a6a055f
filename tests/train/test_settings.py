"""Every setting is checked when the config is built, before any model loads, with one error naming the setting
in both spellings: through the CLI, a YAML recipe and the Python API. docs/settings.md's table of bad settings
is this file's cases and the errors they get (the test fails when the two differ)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from pronghorn.cli import main
from pronghorn.errors import PronghornError
from pronghorn.train.config import TrainConfig
from pronghorn.train.settings import SETTINGS, Setting

DOC = Path(__file__).resolve().parents[2] / "docs" / "settings.md"

CLI = [  # a train flag and a bad value, or a whole command line
    ("--learning-rate", "-1"), ("--learning-rate", "0"), ("--learning-rate", "nan"), ("--embedding-learning-rate", "0"),
    ("--num-epochs", "0"),
    ("--max-steps", "0"), ("--batch-size", "0"), ("--gradient-accumulation-steps", "0"), ("--max-length", "0"),
    ("--warmup-steps", "-5"), ("--warmup-ratio", "1.5"), ("--weight-decay", "-0.01"), ("--max-grad-norm", "-1"),
    ("--adam-beta1", "1"), ("--adam-beta2", "-0.1"), ("--adam-epsilon", "-1e-8"), ("--seed", "-1"),
    ("--r", "0"), ("--lora-alpha", "0"), ("--lora-dropout", "1"), ("--logging-steps", "0"), ("--save-steps", "0"),
    ("--save-total-limit", "0"), ("--tiled-mlp-chunk", "0"), ("--distributed-timeout-s", "0"), ("--beta", "-1"),
    ("--label-smoothing", "0.5"), ("--simpo-gamma", "-1"), ("--max-prompt-length", "0"),
    ("--desirable-weight", "0"), ("--undesirable-weight", "-1"), ("--neftune-noise-alpha", "-5"),
    ("--eval-split", "1"), ("--eval-steps", "0"), ("--eval-batch-size", "0"), ("--eval-steps", "5"),
    ("--lr-scheduler", "step"), ("--method", "ppo"), ("--loss-type", "focal"), ("--dtype", "fp8"),
    ("--train-on", "everything"), ("--overlong", "cut"), ("--truncation-mode", "middle"),
    ("--distributed", "zero3"), ("--data-format", "tsv"), ("--report-to", "mlflow"), ("--optim", "sgd"),
    ("--gradient-checkpointing", "sometimes"), ("--tiled-mlp", "maybe"), ("--sample-by", "page"),
    ("--num-generations", "1"), ("--max-completion-length", "0"), ("--temperature", "0"), ("--top-p", "0"),
    ("--top-k", "-1"), ("--min-p", "1.5"), ("--epsilon", "-0.1"), ("--epsilon-high", "-1"),
    ("--num-iterations", "0"), ("--steps-per-generation", "0"), ("--generation-batch-size", "0"),
    ("--reward-weights", "nan"), ("--scale-rewards", "sometimes"),
]
EXPORT = ["--max-shard-size=lots", "--max-shard-size=0"]
YAML = ["learning_rate: -1", "adam_beta2: 1.0", "lr_scheduler: step"]
API = [dict(learning_rate=-1.0), dict(batch_size=2.5), dict(lora_dropout=-0.1),
       dict(optimizer_in_backward=True), dict(full_finetuning=True, load_in_4bit=True),
       dict(method="grpo", loss_type="sigmoid"), dict(method="dpo", beta=0.0),
       dict(steps_per_generation=2, generation_batch_size=8, method="grpo"),
       dict(generation_batch_size=5, method="grpo"), dict(generation_batch_size=12, method="grpo"),
       dict(steps_per_generation=3, method="grpo")]
PEFT = [dict(r=0), dict(lora_alpha=0), dict(lora_dropout=1.0)]


def _cli_error(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("pronghorn: error: ")
    return err.removeprefix("pronghorn: error: ").strip()


def _rows(tmp_path, capsys) -> list[tuple[str, str, str]]:
    """(interface, what was tried, the error) for every case; nothing is loaded or written."""
    out = tmp_path / "never"
    rows = [("CLI", f"pronghorn train {f}={v}", _cli_error(["train", "--output-dir", str(out), f"{f}={v}"], capsys))
            for f, v in CLI]
    rows += [("CLI", f"pronghorn export --out o {a}", _cli_error(["export", "--out", str(out), a], capsys))
             for a in EXPORT]
    for line in YAML:
        recipe = tmp_path / "recipe.yaml"
        recipe.write_text(line + "\n")
        err = _cli_error(["train", "--config", str(recipe)], capsys)
        assert err.startswith(f"{recipe}: ")
        rows.append(("YAML", f"`{line}` in recipe.yaml", err.replace(str(recipe), "recipe.yaml")))
    for kw in API:
        with pytest.raises(PronghornError) as e:
            TrainConfig(**kw)
        rows.append(("Python", f"TrainConfig({_call(kw)})", str(e.value)))
    from helpers import make_pair
    from pronghorn import FastLanguageModel

    for kw in PEFT:
        with pytest.raises(PronghornError) as e:
            FastLanguageModel.get_peft_model(make_pair("llama3_gqa_rope_scaling")[1], **kw)
        rows.append(("Python", f"FastLanguageModel.get_peft_model(model, {_call(kw)})", str(e.value)))
    assert not out.exists()
    return rows


def _call(kw: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kw.items())


def render(rows) -> str:
    lines = ["| interface | tried | error |", "| --- | --- | --- |"]
    lines += [f"| {i} | `{t}` | {e.replace('|', '/')} |" if not t.startswith("`") else f"| {i} | {t} | {e} |"
              for i, t, e in rows]
    return "\n".join(lines) + "\n"


def test_every_bad_setting_fails_before_loading_and_the_doc_lists_it(tmp_path, capsys):
    rows = _rows(tmp_path, capsys)
    for interface, tried, err in rows:  # each error names the culprit: the flag, or the keyword as given
        culprit = tried.split("=")[0].split()[-1] if interface == "CLI" else tried.split("(")[-1].split("=")[0]
        culprit = culprit.strip("`").split(":")[0].replace("model, ", "")
        assert culprit in err or (culprit == "--max-shard-size" and "max_shard_size" in err), (tried, err)
        if tried.startswith("pronghorn train"):
            assert f"(CLI: {culprit}" in err, (tried, err)  # and how to spell it on the command line
    table = render(rows)
    doc = DOC.read_text()
    assert table in doc, f"{DOC} is out of date; its table of bad settings should read:\n{table}"


def test_every_config_field_has_help_and_the_numbers_are_ranged():
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    assert sorted(names) == sorted(SETTINGS)
    assert all(SETTINGS[n].help for n in names)
    hints = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
    numeric = [n for n in names if ("int" in hints[n] or "float" in hints[n]) and "str" not in hints[n]]
    assert all(SETTINGS[n].low is not None for n in numeric), [n for n in numeric if SETTINGS[n].low is None]
    assert {n.removeprefix("--").replace("-", "_") for n, _ in CLI} >= set(numeric)  # every number tried


def test_defaults_are_allowed_and_bounds_are_exact():
    TrainConfig()
    assert Setting("", low=0, low_open=True).allows(1e-12) and not Setting("", low=0, low_open=True).allows(0)
    beta = SETTINGS["adam_beta1"]
    assert beta.allows(0) and beta.allows(0.999999) and not beta.allows(1) and not beta.allows(float("inf"))
    assert not SETTINGS["batch_size"].allows(True) and not SETTINGS["batch_size"].allows(2.0)
    assert TrainConfig(warmup_ratio=1.0, label_smoothing=0.0, neftune_noise_alpha=0.0).warmup_ratio == 1.0


def test_replace_with_another_method_takes_that_methods_defaults():
    """TRL's defaults differ per trainer (DPO beta 0.1 / sigmoid, GRPO beta 0 / dapo): a config replaced with
    another method gets the new method's, unless the user set them or names them in the replacement."""
    sft = TrainConfig()
    assert (sft.beta, sft.loss_type) == (0.1, "sigmoid")
    grpo = sft.replace(method="grpo")
    assert (grpo.beta, grpo.loss_type) == (0.0, "dapo")
    assert grpo.replace(method="dpo").beta == 0.1
    assert TrainConfig(beta=0.3).replace(method="grpo").beta == 0.3
    assert sft.replace(method="grpo", beta=0.05).beta == 0.05
