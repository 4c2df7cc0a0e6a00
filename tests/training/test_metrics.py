"""Training metrics: the JSONL log trimmed on resume, and one plot per metric (`training/metrics.py`)."""

from __future__ import annotations

import json
from pathlib import Path


def test_metrics_are_the_trainers_log_history_as_json_lines(tmp_path: Path) -> None:
    from mathwizard.training.metrics import write_metrics

    history = [
        {"step": 1, "loss": 2.0},
        {"step": 2, "loss": 1.5, "grad_norm": float("nan")},
        {"step": 2, "eval_loss": 1.7},
    ]
    records = write_metrics(tmp_path / "metrics.jsonl", history)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert (
        records
        == lines
        == [
            {"step": 1, "loss": 2.0},
            {"step": 2, "loss": 1.5, "grad_norm": None},  # JSON has no NaN
            {"step": 2, "eval_loss": 1.7},
        ]
    )


def test_plots_are_written_for_each_metric(tmp_path: Path) -> None:
    from PIL import Image

    from mathwizard.training.metrics import DPO_PLOTS, plot_metrics

    records = [
        {
            "step": s,
            "loss": 0.7 - 0.01 * s,
            "rewards/accuracies": 0.5,
            "rewards/chosen": 0.01 * s,
            "rewards/rejected": -0.01 * s,
            "rewards/margins": 0.02 * s,
        }
        for s in range(1, 6)
    ] + [{"step": 5, "eval_loss": 0.66, "eval_rewards/margins": 0.05}]
    written = plot_metrics(records, DPO_PLOTS, tmp_path)
    assert [p.name for p in written] == [
        "loss.png",
        "rewards_accuracies.png",
        "rewards_chosen.png",
        "rewards_rejected.png",
        "rewards_margins.png",
    ]
    for path in written:
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size == (600, 400)
