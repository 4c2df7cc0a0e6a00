"""Training metrics: the Trainer's log history written to `metrics.jsonl` and drawn as PNG plots."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from mathwizard.manifest import atomic_write_text

log = logging.getLogger(__name__)

# The five figures the original DPO run published, and the SFT loss.
DPO_PLOTS: tuple[tuple[str, str], ...] = (
    ("loss", "loss.png"),
    ("rewards/accuracies", "rewards_accuracies.png"),
    ("rewards/chosen", "rewards_chosen.png"),
    ("rewards/rejected", "rewards_rejected.png"),
    ("rewards/margins", "rewards_margins.png"),
)
SFT_PLOTS: tuple[tuple[str, str], ...] = (("loss", "loss.png"),)


def write_metrics(path: Path, log_history: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The trainer's own log history (restored from the checkpoint on a resumed run, so it reads as one run) as
    `metrics.jsonl`, one JSON line per log; returns the records."""
    records = [_finite(entry) for entry in log_history]
    atomic_write_text(Path(path), "".join(json.dumps(r) + "\n" for r in records))
    return records


def _finite(logs: dict[str, Any]) -> dict[str, Any]:
    """JSON has no NaN/inf: such values become null."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in logs.items()}


def last_value(records: Iterable[dict[str, Any]], key: str) -> float | None:
    value = None
    for record in records:
        if record.get(key) is not None:
            value = record[key]
    return value


def plot_metrics(records: Sequence[dict[str, Any]], plots: Sequence[tuple[str, str]], out: Path) -> list[Path]:
    """One PNG per (metric, file): training values by step, and the `eval_` values when there are any."""
    import matplotlib

    matplotlib.use("Agg")  # no display on workers
    import matplotlib.pyplot as plt

    written = []
    for key, filename in plots:
        train = [(r["step"], r[key]) for r in records if r.get(key) is not None and "train_runtime" not in r]
        evals = [(r["step"], r[f"eval_{key}"]) for r in records if r.get(f"eval_{key}") is not None]
        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
        if train:
            ax.plot(*zip(*train, strict=True), marker="." if len(train) < 50 else None, label="train")
        if evals:
            ax.plot(*zip(*evals, strict=True), marker="o", linestyle="--", label="val")
        if not (train or evals):
            ax.text(0.5, 0.5, f"no {key} logged", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.set_title(key)
        ax.grid(alpha=0.3)
        if train and evals:
            ax.legend()
        fig.tight_layout()
        path = Path(out) / filename
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written
