"""The eval flow: one model's accuracy on the test split, with its table and the run's base/SFT/DPO table.

Usage: `mathwizard eval --label sft` or `eval_flow(settings=load_settings(), label="dpo")`. Each evaluation is a flow
run named after its label (`eval-base`, `eval-sft`, `eval-dpo`), with a progress artifact that moves as generate
batches are scored.
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from mathwizard.config import Settings
from mathwizard.errors import ConfigError
from mathwizard.stages import evaluate as stage
from tasks.artifacts import ProgressArtifact
from tasks.stages import evaluate

LABELS = ("base", "sft", "dpo")


@flow(name="math-wizard-eval", flow_run_name="eval-{label}", log_prints=True)
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
    model = model or (settings.model.name if label == "base" else settings.stage_dir(label))
    data = data or settings.stage_dir("teach")
    out = out or f"{settings.stage_dir('eval')}/{label}"
    cfg = settings.eval
    progress = ProgressArtifact(key=f"eval-{label}-progress", description=f"eval ({label} on {cfg.split}): problems")
    manifest = evaluate(cfg, settings.model, model, data, out, label, progress=progress)

    report = stage.Report.of(manifest)
    row = {"model": label, "n": report.n, "accuracy": report.accuracy, "format_rate": report.format_rate}
    row |= {f"accuracy_{d}": part.accuracy for d, part in report.by_difficulty.items()}
    create_table_artifact(table=[row], key=f"eval-{label}", description=f"{label} on {report.n} problems")
    # Every model evaluated so far in this run, side by side: did each stage help?
    combined = stage.evaluation_table({name: f"{settings.stage_dir('eval')}/{name}" for name in LABELS})
    if combined:
        create_markdown_artifact(markdown=f"### Evaluation\n\n{combined}", key="eval-table", description="base/SFT/DPO")
    return manifest.model_dump(mode="json")
