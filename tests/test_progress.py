"""Progress reports: `Tally` turns "n more finished" from any thread into `progress(done, total)` calls."""

from __future__ import annotations

import threading

from mathwizard.progress import Tally


def test_tally_reports_running_totals() -> None:
    seen: list[tuple[int, int]] = []
    tally = Tally(5, lambda done, total: seen.append((done, total)))
    tally()
    tally(3)
    tally(0)  # a batch with nothing new still reports (the display may refresh)
    tally(1)
    assert seen == [(1, 5), (4, 5), (4, 5), (5, 5)] and tally.done == 5


def test_tally_without_a_callback_only_counts() -> None:
    tally = Tally(3, None)
    tally(2)
    assert tally.done == 2


def test_tally_from_many_threads_loses_nothing() -> None:
    seen: list[int] = []
    tally = Tally(8 * 250, lambda done, total: seen.append(done))
    threads = [threading.Thread(target=lambda: [tally() for _ in range(250)]) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # 8 threads x 250 items = 2,000 calls; under the lock each sees the next count exactly once
    assert tally.done == 2000 and sorted(seen) == list(range(1, 2001))
