"""The pairs flow: flawed answers sampled from the SFT model, checked, and paired with the teacher's solutions.

Usage: `mathwizard pairs` or `pairs_flow(settings=load_settings())`. A progress artifact moves as chunks finish
(chunks resumed from disk count at once); a stage that is already done shows it complete.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from mathwizard.config import Settings
from mathwizard.stages import pairs as stage
from tasks.common import run_with_progress
from tasks.pairs import pairs


@flow(name="pairs", log_prints=True)
def pairs_flow(
    settings: Settings, sft: str | None = None, data: str | None = None, out: str | None = None
) -> dict[str, Any]:
    """Build DPO pairs from the SFT model in `sft` (default: the run's 03-sft) and the teach output in `data`."""
    sft = sft or settings.stage_dir("sft")
    data = data or settings.stage_dir("teach")
    out = out or settings.stage_dir("pairs")
    cfg, model = settings.pairs, settings.model

    fp = stage.expected_fingerprint(cfg, model, Path(sft), Path(data))
    manifest = run_with_progress(
        pairs, out, fp, stage.total_items(cfg, Path(data)), cfg, model, sft, data, out,
        key="pairs-progress", description=f"pairs ({', '.join(cfg.splits)}): items done",
    )  # fmt: skip

    report = json.loads((Path(out) / "report.json").read_text(encoding="utf-8"))
    create_table_artifact(table=summary_rows(report), key="pairs-counts", description=f"DPO pairs in {out}")
    create_markdown_artifact(
        markdown=summary_markdown(report), key="pairs-summary", description="Where pairs came from"
    )
    return manifest.model_dump(mode="json")


def summary_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per flaw strategy plus the total: items, pairs written, from the model, from the rule, failed."""
    names = ("items", "written", "from_model", "from_rule", "failed")
    rows = [{"strategy": s, **{n: counts[n] for n in names}} for s, counts in report["by_strategy"].items()]
    return [*rows, {"strategy": "total", **{n: report[n] for n in names}}]


def summary_markdown(report: dict[str, Any]) -> str:
    share = 100 * report["from_model"] / (report["written"] or 1)
    return (
        f"### DPO pairs\n\n{report['written']} of {report['items']} items paired: "
        f"{report['from_model']} rejected answers sampled from the model ({share:.0f}%), "
        f"{report['from_rule']} written by the rule fallback, {report['failed']} excluded "
        f"({report['attempts']} samples, {report['generated_tokens']} tokens in {report['seconds']:.1f} s).\n"
    )
