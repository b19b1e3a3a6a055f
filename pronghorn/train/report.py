"""Where the training metrics go besides metrics.jsonl and loss.png: ``report_to`` as in HF Trainer.

- ``"none"``: only metrics.jsonl and loss.png.
- ``"tensorboard"``: event files in ``<output_dir>/tensorboard`` (``tensorboard --logdir <output_dir>``), one scalar
  per logged number under ``train/`` (``train/loss``, ``train/lr``, ``train/grad_norm``, ``train/tokens_per_s``,
  and a preference trainer's rewards). Needs the ``tensorboard`` package (``pip install tensorboard``).
- ``"wandb"``: Weights & Biases in offline mode (``<output_dir>/wandb``; ``wandb sync`` uploads it later), the
  same scalars. Needs the ``wandb`` package.

Only the main rank reports. Whether the package is installed is checked when the config is built
(:func:`check_report_to`), before any model loads.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from ..errors import PronghornError, spell

REPORT_TO = ("none", "tensorboard", "wandb")
_PACKAGE = {"tensorboard": "tensorboard", "wandb": "wandb"}


def check_report_to(kind: str) -> str:
    if kind not in REPORT_TO:
        raise PronghornError(f"{spell('report_to')} must be one of {', '.join(REPORT_TO)}, got {kind!r}")
    package = _PACKAGE.get(kind)
    if package and importlib.util.find_spec(package) is None:
        raise PronghornError(f"{spell('report_to', kind)} needs the {package!r} package: pip install {package}")
    return kind


class _TensorBoard:
    def __init__(self, out: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(out / "tensorboard"))

    def log(self, row: dict[str, Any]) -> None:
        for name, value in _scalars(row).items():
            self.writer.add_scalar(f"train/{name}", value, row["step"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _WandbOffline:
    def __init__(self, out: Path, config: dict[str, Any]):
        import wandb

        self.run = wandb.init(mode="offline", dir=str(out), config=config, project="pronghorn")

    def log(self, row: dict[str, Any]) -> None:
        self.run.log({f"train/{k}": v for k, v in _scalars(row).items()}, step=row["step"])

    def close(self) -> None:
        self.run.finish()


def _scalars(row: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in row.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def open_reporter(kind: str, out: str | Path, config: dict[str, Any]):
    """An object with ``log(row)`` and ``close()`` for ``kind``, or None for ``"none"``."""
    out = Path(out)
    if kind == "tensorboard":
        return _TensorBoard(out)
    if kind == "wandb":
        return _WandbOffline(out, config)
    return None
