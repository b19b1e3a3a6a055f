"""Training progress: plain lines every N steps or seconds when the output is not a terminal."""

from __future__ import annotations

import io

from pronghorn.train.progress import TrainProgress


def test_not_a_terminal_prints_a_line_every_n_steps_and_at_the_end():
    out = io.StringIO()
    with TrainProgress(10, enabled=True, stream=out, every_steps=4, every_s=1e9) as bar:
        for step in range(1, 11):
            bar.update(step, 2.0 / step, 1e-4)
    lines = out.getvalue().splitlines()
    assert [ln.split()[1] for ln in lines] == ["4/10", "8/10", "10/10"]
    assert lines[0].startswith("step 4/10 (40%)  loss 0.5000  lr 1.00e-04  elapsed 0:00:00  eta ")


def test_every_few_seconds_too_and_nothing_when_disabled():
    out = io.StringIO()
    with TrainProgress(1000, start=10, enabled=True, stream=out, every_steps=10**6, every_s=0.0) as bar:
        bar.update(11, 1.0, 0.0)
        bar.update(12, 1.0, 0.0)
    assert [ln.split()[1] for ln in out.getvalue().splitlines()] == ["11/1000", "12/1000"]
    quiet = io.StringIO()
    with TrainProgress(5, enabled=False, stream=quiet) as bar:
        bar.update(5, 1.0, 0.0)
    assert quiet.getvalue() == ""


def test_notes_go_among_the_lines_and_nowhere_when_disabled():
    out, quiet = io.StringIO(), io.StringIO()
    with TrainProgress(4, enabled=True, stream=out, every_steps=4, every_s=1e9) as bar:
        bar.note("step 0: eval_loss 2.0000  eval_perplexity 7.389")
        bar.update(4, 1.0, 0.0)
    with TrainProgress(4, enabled=False, stream=quiet) as bar:
        bar.note("hidden")
    assert out.getvalue().splitlines()[0] == "step 0: eval_loss 2.0000  eval_perplexity 7.389"
    assert quiet.getvalue() == ""
