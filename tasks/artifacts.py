"""Helpers that show stage results in the Prefect UI: tables, progress, and PNG plots inline."""

from __future__ import annotations

import base64
import threading
import time
from pathlib import Path
from uuid import UUID

from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact


def create_image_artifact(png: Path, *, key: str, title: str, description: str | None = None) -> None:
    """A markdown artifact embedding the PNG as a data URI, so the UI shows the plot without file access."""
    data = base64.b64encode(Path(png).read_bytes()).decode()
    create_markdown_artifact(
        markdown=f"### {title}\n\n![{title}](data:image/png;base64,{data})\n",
        key=key,
        description=description or title,
    )


class ProgressArtifact:
    """Live progress of a long loop in the UI, fed through the library's `progress(n)` callback.

    Call it with the number of items just finished (the teacher runner's and the samplers' `Progress` callback).
    Updates reach the server at most every `every_s` seconds and once at the end, so 6,000 items cost a few dozen
    API calls, not 6,000. Safe to call from worker threads and from inside an event loop (it always calls the
    synchronous API).

    Example:
        progress = ProgressArtifact(total=len(items), key="teach-progress", description="teacher: train split")
        runner.run(items, progress=progress)
        progress.finish()
    """

    def __init__(self, total: int, *, key: str | None = None, description: str, every_s: float = 2.0) -> None:
        self.total, self.done, self.every_s, self.description = max(total, 0), 0, every_s, description
        self._lock = threading.Lock()
        self.id: UUID = create_progress_artifact(  # type: ignore[assignment]
            progress=0.0, key=key, description=self._describe(), _sync=True
        )
        self._last = time.monotonic()  # creation showed 0 %

    def _describe(self) -> str:
        return f"{self.description}: {self.done:,} of {self.total:,}"

    @property
    def percent(self) -> float:
        return 100.0 if self.total == 0 else min(100.0, 100.0 * self.done / self.total)

    def __call__(self, n: int = 1) -> None:
        with self._lock:
            self.done += n
            now = time.monotonic()
            if now - self._last < self.every_s and self.done < self.total:
                return
            self._last = now
            self._send()

    def finish(self) -> None:
        """Show the final count (also when the loop skipped items that were already done)."""
        with self._lock:
            self._send()

    def _send(self) -> None:
        update_progress_artifact(self.id, progress=self.percent, description=self._describe(), _sync=True)
