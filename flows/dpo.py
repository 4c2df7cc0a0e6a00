"""The DPO flow: preference alignment of the SFT model on the pairs, images included.

Usage: `mathwizard dpo` or `dpo_flow(settings=load_settings())`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow

from mathwizard.config import Settings
from mathwizard.training.metrics import DPO_PLOTS
from tasks.artifacts import ProgressArtifact, training_artifacts
from tasks.stages import dpo


@flow(name="math-wizard-dpo", flow_run_name="dpo", log_prints=True)
def dpo_flow(
    settings: Settings, sft: str | None = None, pairs: str | None = None, out: str | None = None
) -> dict[str, Any]:
    """Align the SFT model in `sft` (default: the run's 03-sft) on `pairs` (its 04-pairs) into `out` (its 05-dpo)."""
    sft = sft or settings.stage_dir("sft")
    pairs = pairs or settings.stage_dir("pairs")
    out = out or settings.stage_dir("dpo")
    progress = ProgressArtifact(key="dpo-progress", description="dpo: optimizer steps")
    manifest = dpo(settings.dpo, settings.model, sft, pairs, out, progress=progress)
    training_artifacts("dpo", manifest, Path(out), DPO_PLOTS)
    return manifest.model_dump(mode="json")
