"""Progress of a long stage as `progress(done, total, **metrics)` calls, for whoever watches.

The library never imports a display: a stage takes an optional `Progress` callable and calls it as work finishes
(training stages add their latest metrics, e.g. `loss=2.31`). The Prefect layer turns those calls into progress
artifacts and also `announce`s them here, where a watcher registered with `watching` (the CLI's live display)
sees every long loop of the process without the flows knowing about terminals.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Protocol


class Progress(Protocol):
    """`progress(items or steps done, total, **latest metrics)`."""

    def __call__(self, done: int, total: int, /, **metrics: float) -> None: ...


# (key, description, done, total, metrics): one call per progress report of any stage in this process.
Watcher = Callable[[str, str, int, int, Mapping[str, float]], None]

_watchers: list[Watcher] = []
_watchers_guard = threading.Lock()


@contextmanager
def watching(watcher: Watcher) -> Iterator[None]:
    """Send every `announce`d progress report to `watcher` while the block runs."""
    with _watchers_guard:
        _watchers.append(watcher)
    try:
        yield
    finally:
        with _watchers_guard:
            _watchers.remove(watcher)


def announce(key: str, description: str, done: int, total: int, metrics: Mapping[str, float]) -> None:
    """Tell the watchers how far the loop `key` got."""
    with _watchers_guard:
        watchers = list(_watchers)
    for watcher in watchers:
        watcher(key, description, done, total, metrics)


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

    def note(self, **metrics: float) -> None:
        """Report the latest metrics (e.g. a batch's request counts) without finishing anything."""
        with self._lock:
            if self._progress is not None:
                self._progress(self.done, self.total, **metrics)
