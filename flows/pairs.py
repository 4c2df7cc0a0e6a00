"""The pairs flow: flawed answers sampled from the SFT model, checked, and paired with the teacher's solutions.

Usage: `mathwizard pairs` or `pairs_flow(settings=load_settings())`. A progress artifact moves as chunks finish
(chunks resumed from disk count at once).
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from mathwizard.config import Settings
from mathwizard.stages.pairs import Report
from tasks.artifacts import ProgressArtifact
from tasks.stages import pairs


@flow(name="math-wizard-pairs", flow_run_name="pairs", log_prints=True)
def pairs_flow(
    settings: Settings, sft: str | None = None, data: str | None = None, out: str | None = None
) -> dict[str, Any]:
    """Build DPO pairs from the SFT model in `sft` (default: the run's 03-sft) and the teach output in `data`."""
    sft = sft or settings.stage_dir("sft")
    data = data or settings.stage_dir("teach")
    out = out or settings.stage_dir("pairs")
    cfg = settings.pairs
    progress = ProgressArtifact(key="pairs-progress", description=f"pairs ({', '.join(cfg.splits)}): items done")
    manifest = pairs(cfg, settings.model, sft, data, out, progress=progress)
    report = Report.of(manifest)
    create_table_artifact(table=summary_rows(report), key="pairs-counts", description=f"DPO pairs in {out}")
    create_markdown_artifact(markdown=summary_markdown(report), key="pairs-summary", description="Sources")
    return manifest.model_dump(mode="json")


def summary_rows(report: Report) -> list[dict[str, Any]]:
    """One row per flaw strategy plus the total: items, pairs written, from the model, from the rule, failed."""
    names = ("items", "written", "from_model", "from_rule", "failed")
    rows = [{"strategy": s, **counts.model_dump(include=set(names))} for s, counts in report.by_strategy.items()]
    return [*rows, {"strategy": "total", **report.model_dump(include=set(names))}]


def summary_markdown(report: Report) -> str:
    share = 100 * report.from_model / (report.written or 1)
    return (
        f"### DPO pairs\n\n{report.written} of {report.items} items paired: "
        f"{report.from_model} rejected answers sampled from the model ({share:.0f}%), "
        f"{report.from_rule} written by the rule fallback, {report.failed} excluded "
        f"({report.attempts} samples, {report.generated_tokens} tokens in {report.seconds:.1f} s).\n"
    )
