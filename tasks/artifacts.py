"""What the Prefect UI shows of a stage: live progress, tables, and PNG plots inline."""

from __future__ import annotations

import base64
import threading
import time
from pathlib import Path
from typing import Any
from uuid import UUID

from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from mathwizard.manifest import Manifest
from mathwizard.progress import announce


def create_image_artifact(png: Path, *, key: str, title: str, description: str | None = None) -> None:
    """A markdown artifact embedding the PNG as a data URI, so the UI shows the plot without file access."""
    data = base64.b64encode(Path(png).read_bytes()).decode()
    create_markdown_artifact(
        markdown=f"### {title}\n\n![{title}](data:image/png;base64,{data})\n",
        key=key,
        description=description or title,
    )


class ProgressArtifact:
    """Live progress of a stage in the UI: a `mathwizard.progress.Progress`, `progress(done, total, **metrics)`.

    The artifact is created at the first report, so a stage that is skipped (already done) shows none. Updates reach
    the server at most every `every_s` seconds and at the end, so 6,000 items cost a few dozen API calls, not 6,000.
    Every report is also `announce`d to this process's watchers (the CLI's live display). Safe to call from worker
    threads and from inside an event loop (it always calls the synchronous API).

    Example:
        progress = ProgressArtifact(key="teach-progress", description="teach: items")
        teach(cfg, data, out, cache, progress=progress)
    """

    def __init__(self, *, key: str, description: str, every_s: float = 2.0) -> None:
        self.key, self.description, self.every_s = key, description, every_s
        self.id: UUID | None = None
        self._lock = threading.Lock()
        self._last = 0.0

    def __call__(self, done: int, total: int, /, **metrics: float) -> None:
        announce(self.key, self.description, done, total, metrics)
        with self._lock:
            now = time.monotonic()
            if self.id is not None and now - self._last < self.every_s and done < total:
                return
            self._last = now
            percent = 100.0 if total <= 0 else min(100.0, 100.0 * done / total)
            shown = "".join(f" · {name} {value:.4g}" for name, value in metrics.items())
            text = f"{self.description}: {done:,} of {total:,}{shown}"
            if self.id is None:
                self.id = create_progress_artifact(progress=percent, key=self.key, description=text, _sync=True)  # type: ignore[assignment]
            else:
                update_progress_artifact(self.id, progress=percent, description=text, _sync=True)


def training_artifacts(stage: str, manifest: Manifest, out: Path, plots: tuple[tuple[str, str], ...]) -> None:
    """A training stage's report as a table, and its plots (loss, rewards) inline."""
    create_table_artifact(table=report_rows(manifest), key=f"{stage}-metrics", description=f"{stage} run in {out}")
    for metric, filename in plots:
        png = Path(out) / filename
        if png.is_file():
            key = f"{stage}-{filename.removesuffix('.png').replace('_', '-')}"
            create_image_artifact(png, key=key, title=f"{stage}: {metric}")


def report_rows(manifest: Manifest) -> list[dict[str, Any]]:
    """One row per scalar in the stage's report, plus the stage's wall time."""
    rows = [
        {"metric": name, "value": round(value, 6) if isinstance(value, float) else value}
        for name, value in manifest.report.items()
        if isinstance(value, int | float | str)
    ]
    return [*rows, {"metric": "seconds", "value": manifest.seconds}]
