"""Progress of a long stage as `progress(done, total)` calls, for whoever watches: the CLI's display, the Prefect UI.

The library never imports a display: a stage takes an optional `Progress` callable and calls it as work finishes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

Progress = Callable[[int, int], None]  # (items or steps done, total)


class Tally:
    """Turns "n more finished" reports, from any thread, into `progress(done, total)` calls."""

    def __init__(self, total: int, progress: Progress | None) -> None:
        self.total, self.done = total, 0
        self._progress = progress
        self._lock = threading.Lock()

    def __call__(self, n: int = 1) -> None:
        with self._lock:
            self.done += n
            if self._progress is not None:
                self._progress(self.done, self.total)
