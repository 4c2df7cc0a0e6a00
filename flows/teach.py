"""The teach flow: every item rewritten by the teacher under the API's limits, with live progress and failures.

Usage: `mathwizard teach --teacher openai [--mode batch]` or `teach_flow(settings=load_settings())`. When a run fails
(API down, too many failures, a crash), a plain re-run or `prefect flow-run retry` pays only for what is not cached yet.

Batch mode (`teacher.mode=batch`) runs the `teach-batch` task: each attempt resumes the batches recorded in the
journal next to the teacher cache, waits for them at most `teacher.batch_wait_s`, then stops with BatchPending, which
the task retries after `tasks.stages.BATCH_RETRY_DELAY_S` (for up to a day): no attempt polls for hours, and a
crashed or cancelled flow run loses nothing (its retry, or a re-run, finds the same batches). The progress artifact
shows the items done and the batches' request counts and statuses; the `teach-batches` table lists the batches.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow
from prefect.artifacts import create_table_artifact

from mathwizard.config import Settings
from mathwizard.stages import teach as stage
from tasks.artifacts import ProgressArtifact
from tasks.stages import teach, teach_batch


@flow(name="math-wizard-teach", flow_run_name="teach", log_prints=True)
def teach_flow(settings: Settings, data: str | None = None, out: str | None = None) -> dict[str, Any]:
    """Rewrite the prepared splits in `data` (default: the run's `01-prepare`) into `out` (`02-teach`)."""
    cfg = settings.teacher
    data = data or settings.stage_dir("prepare")
    out = out or settings.stage_dir("teach")
    batch = cfg.mode == "batch"
    progress = ProgressArtifact(
        key="teach-progress", description=f"teach ({cfg.split}{', batch' if batch else ''}): items done"
    )
    try:
        manifest = (teach_batch if batch else teach)(cfg, data, out, settings.cache_dir, progress=progress)
    finally:
        _failures_table(Path(out))  # also after too many failures: the report was written before the error
        if batch:
            _batches_table(Path(out))
    return manifest.model_dump(mode="json")


def _batches_table(out: Path) -> None:
    """The batches of the last attempt (ids, statuses, request counts), from the stage's report."""
    path = out / stage.REPORT_FILE
    if not path.is_file():
        return
    report = stage.Report.model_validate_json(path.read_text(encoding="utf-8"))
    rows = [line.model_dump() for line in report.batches] or [{"id": "(none)", "status": "", "requests": 0}]
    cost = "unknown" if report.estimated_cost_usd is None else f"${report.estimated_cost_usd:,.4f}"
    create_table_artifact(
        table=rows,
        key="teach-batches",
        description=f"teach batches: {report.batch_requests:,} requests sent in {len(report.batch_ids)}; cost {cost}",
    )


def _failures_table(out: Path) -> None:
    """Failures by reason, from the stage's report."""
    path = out / stage.REPORT_FILE
    if not path.is_file():
        return
    report = stage.Report.model_validate_json(path.read_text(encoding="utf-8"))
    reasons = report.failures_by_reason
    rows = [{"reason": reason, "items": n} for reason, n in reasons.items()] or [{"reason": "(none)", "items": 0}]
    create_table_artifact(
        table=rows,
        key="teach-failures",
        description=(
            f"teach ({report.teacher}: {report.model}): {report.written:,} written, {report.failed:,} failed of "
            f"{report.items:,}; {report.api_calls:,} API calls, {report.cache_hits:,} cache hits, "
            f"{report.retries:,} retries"
        ),
    )
