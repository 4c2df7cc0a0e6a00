"""Resume from the last complete checkpoint, and never from one made with other settings.

The Trainer writes a checkpoint's `trainer_state.json` last, so a folder without it is the remains of a kill
mid-save: it is removed. A `fingerprint.txt` beside the checkpoints records which settings made them; when a
run starts with other settings, the old checkpoints are discarded instead of resumed into the wrong schedule.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

from mathwizard.manifest import atomic_write_text

log = logging.getLogger(__name__)

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
FINGERPRINT_FILE = "fingerprint.txt"


def checkpoint_step(path: Path) -> int | None:
    match = _CHECKPOINT.match(Path(path).name)
    return int(match.group(1)) if match else None


def prepare_checkpoints(folder: Path, fingerprint: str) -> None:
    """Create `folder`; empty it when its checkpoints were made with another fingerprint."""
    folder = Path(folder)
    stamp = folder / FINGERPRINT_FILE
    if folder.is_dir() and any(folder.iterdir()):
        previous = stamp.read_text(encoding="utf-8").strip() if stamp.is_file() else None
        if previous != fingerprint:
            log.warning("discarding checkpoints in %s: they were made with other settings", folder)
            shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(stamp, fingerprint + "\n")


def last_checkpoint(folder: Path) -> Path | None:
    """The newest complete `checkpoint-N` under `folder`, or None; incomplete ones (no trainer_state.json, written
    last) are deleted first, so transformers' `get_last_checkpoint` can only pick a whole one."""
    from transformers.trainer_utils import get_last_checkpoint

    folder = Path(folder)
    if not folder.is_dir():
        return None
    for path in folder.iterdir():
        if path.is_dir() and checkpoint_step(path) is not None and not (path / "trainer_state.json").is_file():
            log.warning("removing incomplete checkpoint %s (interrupted while saving)", path)
            shutil.rmtree(path, ignore_errors=True)
    found = get_last_checkpoint(str(folder))
    return Path(found) if found else None
