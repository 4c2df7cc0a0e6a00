"""The teach flow: chunk tasks fill the per-item reply cache under shared API limits, then one task writes the splits.

Usage: `mathwizard teach --teacher openai` or `teach_flow(settings=load_settings())`. A progress artifact moves as
chunks finish and a table artifact lists failures by reason. When a run fails (API down, too many failures), a
plain re-run or `prefect flow-run retry` pays only for what is not cached yet.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner

from mathwizard.config import Settings
from mathwizard.errors import TeacherError
from mathwizard.manifest import reusable
from mathwizard.stages import teach as stage
from tasks.artifacts import ProgressArtifact
from tasks.teach import teach_assemble, teach_chunk


# Two chunks in flight: while one drains its last slow items the next already feeds the shared request pipeline.
@flow(name="teach", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=2))
def teach_flow(settings: Settings, data: str | None = None, out: str | None = None) -> dict[str, Any]:
    """Rewrite the prepared splits in `data` (default: the run's `01-prepare`) into `out` (`02-teach`)."""
    logger = get_run_logger()
    cfg = settings.teacher
    data = data or settings.stage_dir("prepare")
    out = out or settings.stage_dir("teach")
    cache_dir = settings.cache_dir
    fp = stage.expected_fingerprint(cfg, Path(data))  # also: one clear line for a missing key or upstream
    if (done := reusable(Path(out), fp)) is not None:
        logger.info("%s is up to date; nothing to ask", out)
        _failures_table(out)
        return done.model_dump(mode="json")

    started_at = time.time()
    chunks = stage.plan(cfg, Path(data))
    total = sum(c.stop - c.start for c in chunks)
    progress = ProgressArtifact(total, key="teach-progress", description=f"teach ({cfg.split}): items done")
    session = uuid.uuid4().hex  # the chunks of this run share one set of API limits
    results: list[stage.ChunkResult] = []
    futures = []
    try:
        futures = [teach_chunk.submit(cfg, data, cache_dir, chunk, session) for chunk in chunks]
        for future in as_completed(futures):
            future.wait()
            result = future.result()  # raises the chunk's error: the flow run fails, the cache keeps what finished
            results.append(result)
            progress(result.items)
    except BaseException:
        stage.stop(session)  # chunks not started yet fail at once; running ones see the same abort
        for future in futures:  # let them end before their shared runner closes
            future.wait()
        raise
    finally:
        stage.release(session)
    progress.finish()
    try:
        manifest = teach_assemble(cfg, data, out, cache_dir, results, started_at)
    except TeacherError:
        _failures_table(out)  # too many failures: raised after the report was written; show it all the same
        raise
    _failures_table(out)
    return manifest.model_dump(mode="json")


def _failures_table(out: str) -> None:
    """Failures by reason from the stage's report (written also when too many items failed)."""
    path = Path(out) / stage.REPORT_FILE
    if not path.is_file():
        return
    report = json.loads(path.read_text(encoding="utf-8"))
    reasons = report.get("failures_by_reason") or {}
    rows = [{"reason": reason, "items": n} for reason, n in reasons.items()] or [{"reason": "(none)", "items": 0}]
    create_table_artifact(
        table=rows,
        key="teach-failures",
        description=(
            f"teach ({report.get('teacher')}: {report.get('model')}): {report.get('written', 0):,} written, "
            f"{report.get('failed', 0):,} failed of {report.get('items', 0):,}; {report.get('api_calls', 0):,} API "
            f"calls, {report.get('cache_hits', 0):,} cache hits, {report.get('retries', 0):,} retries"
        ),
    )
