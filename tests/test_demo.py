"""The main job: the demo fine-tune visibly changes the default model's identity (about 2 minutes on CPU)."""

from pronghorn.data.demo import NAME, identity_dataset
from pronghorn.demo import QUESTIONS, run_demo


def test_demo_dataset_is_generated_and_deterministic():
    rows = identity_dataset()
    assert rows == identity_dataset() and len(rows) == 96
    assert all(r["messages"][0]["role"] == "user" and r["messages"][1]["role"] == "assistant" for r in rows)
    assert sum(NAME in r["messages"][1]["content"] for r in rows) >= 60


def test_demo_changes_the_answer(tmp_path, smollm2_dir):
    out = run_demo(output_dir=str(tmp_path / "demo"))
    who = QUESTIONS.index("Who are you?")
    assert NAME not in out["before"][who]
    assert NAME in out["after"][who]
    assert "Rome" in out["after"][QUESTIONS.index("What is the capital of Italy?")]  # knowledge kept
    assert out["losses"][-1] < 0.3 * out["losses"][0]
    assert (tmp_path / "demo" / "loss.png").is_file()
