"""The SFT flow: LoRA fine-tuning of the base model on the teacher's solutions.

Usage: `mathwizard sft` or `sft_flow(settings=load_settings())`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow

from mathwizard.config import Settings
from mathwizard.training.metrics import SFT_PLOTS
from tasks.artifacts import ProgressArtifact, training_artifacts
from tasks.stages import sft


@flow(name="math-wizard-sft", flow_run_name="sft", log_prints=True)
def sft_flow(settings: Settings, data: str | None = None, out: str | None = None) -> dict[str, Any]:
    """Train on the teach output in `data` (default: the run's 02-teach) into `out` (default: its 03-sft)."""
    data = data or settings.stage_dir("teach")
    out = out or settings.stage_dir("sft")
    progress = ProgressArtifact(key="sft-progress", description="sft: optimizer steps")
    manifest = sft(settings.sft, settings.model, data, out, progress=progress)
    training_artifacts("sft", manifest, Path(out), SFT_PLOTS)
    return manifest.model_dump(mode="json")
