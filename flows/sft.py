"""The SFT flow: LoRA fine-tuning of the base model on the teacher's solutions.

Usage: `mathwizard sft` or `sft_flow(settings=load_settings())`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow
from prefect.artifacts import create_table_artifact

from mathwizard.config import Settings
from mathwizard.manifest import Manifest
from mathwizard.stages import sft as stage
from mathwizard.training.metrics import SFT_PLOTS
from tasks.artifacts import create_image_artifact
from tasks.common import unless_missing
from tasks.sft import sft


@flow(name="sft", log_prints=True)
def sft_flow(settings: Settings, data: str | None = None, out: str | None = None) -> dict[str, Any]:
    """Train on the teach output in `data` (default: the run's 02-teach) into `out` (default: its 03-sft)."""
    data = data or settings.stage_dir("teach")
    out = out or settings.stage_dir("sft")
    cfg, model = settings.sft, settings.model

    stage.check_inputs(cfg, model, Path(data))  # one clear line before any training starts
    fp = stage.expected_fingerprint(cfg, model, Path(data))
    manifest = unless_missing(sft, out, fp)(cfg, model, data, out)

    publish_artifacts("sft", manifest, Path(out), SFT_PLOTS)
    return manifest.model_dump(mode="json")


def metrics_table(manifest: Manifest) -> list[dict[str, Any]]:
    """One row per reported figure: steps, losses, rewards, parameters, backend."""
    extra, counts = manifest.extra, manifest.counts
    rows = [{"metric": name, "value": counts[name]} for name in sorted(counts)]
    for name in sorted(extra):
        value = extra[name]
        if isinstance(value, int | float | str) and value is not None and name != "train_settings":
            rows.append({"metric": name, "value": round(value, 6) if isinstance(value, float) else value})
    rows.append({"metric": "seconds", "value": manifest.seconds})
    return rows


def publish_artifacts(stage: str, manifest: Manifest, out: Path, plots: tuple[tuple[str, str], ...]) -> None:
    create_table_artifact(table=metrics_table(manifest), key=f"{stage}-metrics", description=f"{stage} run in {out}")
    for metric, filename in plots:
        png = Path(out) / filename
        if png.is_file():
            key = f"{stage}-{filename.removesuffix('.png').replace('_', '-')}"
            create_image_artifact(png, key=key, title=f"{stage}: {metric}")
