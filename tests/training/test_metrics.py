"""Training metrics: the JSONL log trimmed on resume, and one plot per metric (`training/metrics.py`)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace


def test_metrics_callback_trims_steps_after_the_resumed_checkpoint(tmp_path: Path) -> None:
    from mathwizard.training.metrics import metrics_callback, read_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2, 3)) + '{"step": 4, "lo')
    callback = metrics_callback(path)
    callback.on_train_begin(None, SimpleNamespace(global_step=2), None)
    callback.on_log(
        None, SimpleNamespace(global_step=3, epoch=0.5), None, logs={"loss": 0.25, "grad_norm": float("nan")}
    )
    records = read_metrics(path)
    # steps 1-2 kept (up to the checkpoint), the stale 3 and the torn 4 dropped, the new 3 appended
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[-1] == {"step": 3, "epoch": 0.5, "loss": 0.25, "grad_norm": None}


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
