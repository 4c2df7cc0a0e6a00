"""The prepare flow: fetch → clean → split MM_Math, with a table artifact of counts and quarantine reasons.

Usage: `mathwizard prepare --source sample` or `prepare_flow(settings=load_settings())`.
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.artifacts import create_table_artifact

from mathwizard.config import Settings
from mathwizard.stages.prepare import Report
from tasks.stages import prepare


@flow(name="math-wizard-prepare", flow_run_name="prepare", log_prints=True)
def prepare_flow(settings: Settings, out: str | None = None) -> dict[str, Any]:
    """Fetch, clean and split MM_Math into `out` (default: the run's `01-prepare` folder); returns the manifest."""
    out = out or settings.stage_dir("prepare")
    manifest = prepare(settings.prepare, out)
    create_table_artifact(table=_rows(Report.of(manifest)), key="prepare-counts", description=f"MM_Math in {out}")
    return manifest.model_dump(mode="json")


def _rows(report: Report) -> list[dict[str, Any]]:
    """Rows, splits and quarantine reasons as one table."""
    rows: list[dict[str, Any]] = [
        {"what": "rows read", "count": report.rows_in},
        {"what": "kept", "count": report.kept},
        *({"what": f"split {name}", "count": n} for name, n in report.splits.items()),
        {"what": "quarantined", "count": report.quarantined},
    ]
    return rows + [{"what": f"quarantine: {reason}", "count": n} for reason, n in report.quarantine_reasons.items()]
