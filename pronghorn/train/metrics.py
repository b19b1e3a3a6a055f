"""Training metrics: a JSONL line per logged step, and a loss-curve PNG at the end."""

from __future__ import annotations

import json
from pathlib import Path

from ..files import atomic_file


class MetricsLog:
    def __init__(self, path: str | Path, resume: bool = False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rows: list[dict] = []
        if resume and self.path.is_file():
            self.rows = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
        elif self.path.exists():
            self.path.unlink()

    def log(self, row: dict) -> None:
        self.rows.append(row)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def truncate_after(self, step: int) -> None:
        """Drop rows past ``step`` (after resuming from an earlier checkpoint) and rewrite the file."""
        self.rows = [r for r in self.rows if r.get("step", 0) <= step]
        with atomic_file(self.path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in self.rows)

    def plot_loss(self, png: str | Path) -> Path | None:
        pts = [(r["step"], r["loss"]) for r in self.rows if "loss" in r]
        if not pts:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
        ax.plot(*zip(*pts), marker="." if len(pts) < 60 else None)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("training loss")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        png = Path(png)
        with atomic_file(png) as f:
            fig.savefig(f, format="png")
        plt.close(fig)
        return png
