"""Functions the launcher tests start on several processes (`mathwizard.launch`); importable by every rank."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from mathwizard.errors import DataError
from mathwizard.launch import rank

log = logging.getLogger("mathwizard.tests")


def count_then_fail(items: int, folder: str, progress) -> dict:
    """Each rank reports `items` done one by one and logs a line; rank 1 then fails once rank 0 has counted (a file
    in `folder` says so: on a busy machine rank 0 may start late), rank 0 waits to be stopped."""
    for done in range(1, items + 1):
        progress(done, items)
    log.warning("rank %d counted %d items", rank(), items)
    counted = Path(folder, "rank-0.counted")
    if rank() == 0:
        counted.write_text("")
    if rank() == 1:
        deadline = time.monotonic() + 30
        while not counted.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        raise DataError("x.parquet has no rows; run `mathwizard teach` first")
    time.sleep(60)
    return {"rank": rank()}


def answer(value: int, progress) -> dict:
    progress(1, 1)
    return {"rank": rank(), "value": value * 2}


def wait_forever(folder: str, progress) -> None:
    """Write this rank's pid, then sleep until stopped."""
    Path(folder, f"rank-{rank()}.pid").write_text(str(os.getpid()))
    time.sleep(600)


def die_then_wait(code: int, progress) -> None:
    """Rank 1 ends at once without a word (as the kernel's OOM killer or a crash in native code would end it; `code`
    < 0: killed by that signal); rank 0 waits to be stopped."""
    if rank() == 1:
        if code < 0:
            os.kill(os.getpid(), -code)
        os._exit(code)
    time.sleep(60)
