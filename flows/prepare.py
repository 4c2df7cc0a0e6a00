"""The prepare flow: fetch → clean → split MM_Math, with a table artifact of counts and quarantine reasons.

Usage: `mathwizard prepare --source sample` or `prepare_flow(settings=load_settings())`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow
from prefect.artifacts import create_table_artifact

from mathwizard.config import Settings
from mathwizard.manifest import Manifest
from mathwizard.stages import prepare as stage
from tasks.common import unless_missing
from tasks.prepare import clean, fetch, split


@flow(name="prepare", log_prints=True)
def prepare_flow(settings: Settings, out: str | None = None) -> dict[str, Any]:
    """Fetch, clean and split MM_Math into `out` (default: the run's `01-prepare` folder); returns the manifest."""
    cfg = settings.prepare
    out = out or settings.stage_dir("prepare")
    raw, clean_dir = f"{out}/{stage.RAW_DIR}", f"{out}/{stage.CLEAN_DIR}"
    stage.check_inputs(cfg, Path(out))  # one clear line before any task runs

    # Each step is skipped when Prefect holds its result and its folder still holds that manifest.
    fetched = unless_missing(fetch, raw, stage.fetch_fingerprint(cfg))(cfg, raw)
    cleaned = unless_missing(clean, clean_dir, stage.clean_fingerprint(cfg, fetched.fingerprint))(cfg, raw, clean_dir)
    manifest = unless_missing(split, out, stage.split_fingerprint(cfg, cleaned.fingerprint))(
        cfg, clean_dir, out, raw=raw
    )

    create_table_artifact(table=_summary_rows(manifest), key="prepare-counts", description=f"MM_Math prepared in {out}")
    return manifest.model_dump(mode="json")


def _summary_rows(manifest: Manifest) -> list[dict[str, Any]]:
    """Rows, splits and quarantine reasons as one table."""
    c = manifest.counts
    rows: list[dict[str, Any]] = [
        {"what": "rows read", "count": c.get("rows_in", 0)},
        {"what": "kept", "count": c.get("kept", 0)},
        *({"what": f"split {name}", "count": c.get(name, 0)} for name in ("train", "val", "test")),
        {"what": "quarantined", "count": c.get("quarantined", 0)},
    ]
    rows += [
        {"what": f"quarantine: {key.split('.', 1)[1]}", "count": n}
        for key, n in sorted(c.items())
        if key.startswith("quarantined.")
    ]
    return rows
