"""The eval flow: one model's accuracy on the test split, with its table and the run's base/SFT/DPO table.

Usage: `mathwizard eval --label sft` or `eval_flow(settings=load_settings(), label="dpo")`. A progress artifact moves
as generate batches are scored; an evaluation that is already done shows it complete.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from mathwizard.config import Settings
from mathwizard.errors import ConfigError
from mathwizard.stages import evaluate as stage
from tasks.common import run_with_progress
from tasks.evaluate import evaluate

LABELS = ("base", "sft", "dpo")


@flow(name="eval", log_prints=True)
def eval_flow(
    settings: Settings,
    model: str | None = None,
    data: str | None = None,
    out: str | None = None,
    label: str = "sft",
) -> dict[str, Any]:
    """Evaluate `model` (default: the base model for label "base", else the run's stage folder of `label`).

    Data defaults to the run's 02-teach folder, output to `06-eval/<label>`.
    """
    if model is None and label not in LABELS:
        raise ConfigError(f"label {label!r} names no stage model; pass --model or use one of {', '.join(LABELS)}")
    location = model or (settings.model.name if label == "base" else settings.stage_dir(label))
    model_cfg = settings.model.model_copy(update={"name": location})
    data = data or settings.stage_dir("teach")
    out = out or f"{settings.stage_dir('eval')}/{label}"
    cfg = settings.eval

    fp = stage.expected_fingerprint(cfg, model_cfg, Path(data), label)
    manifest = run_with_progress(
        evaluate, out, fp, stage.total_items(cfg, Path(data)), cfg, model_cfg, data, out, label,
        key="eval-progress", description=f"eval ({label} on {cfg.split}): problems done",
    )  # fmt: skip

    report = stage.load_report(out)
    create_table_artifact(
        table=[_row(label, report)], key=f"eval-{label}", description=f"{label} on {report['n']} problems"
    )
    # Every model evaluated so far in this run, side by side: did each stage help?
    combined = stage.evaluation_table({name: f"{settings.stage_dir('eval')}/{name}" for name in LABELS})
    if combined:
        create_markdown_artifact(markdown=f"### Evaluation\n\n{combined}", key="eval-table", description="base/SFT/DPO")
    return manifest.model_dump(mode="json")


def _row(label: str, report: dict[str, Any]) -> dict[str, Any]:
    row = {"model": label, "n": report["n"], "accuracy": report["accuracy"], "format_rate": report["format_rate"]}
    return row | {f"accuracy_{d}": part["accuracy"] for d, part in report["by_difficulty"].items()}
