"""One writer per run folder: a second run on the same home and run name stops at once, naming the holder.

On a local (or NFS) folder the lock is the kernel's `flock` on `<run>/.lock`: it is released when its holder exits,
even after `kill -9`, so a stale lock never blocks anyone. On an fsspec URL (`s3://...`), where no kernel arbitrates,
`.lock` holds the holder's id and a heartbeat renewed every few seconds; a heartbeat older than `stale_s` means a dead
holder, whose lock is taken over. That is best effort: two machines starting within the same second can both win.

Re-entrant: the pipeline holds its run's lock while its stages (subflows in the same process) take it again. A stage
dispatched to a worker gets the holder's id (`holder=`) and runs under the lock its pipeline holds.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from mathwizard import storage
from mathwizard.errors import MathWizardError

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"
STALE_S = 60.0  # remote locks: a heartbeat older than this is a dead holder's
_POLL_S = 1.0

_held: dict[str, tuple[str, int]] = {}  # run folder -> (holder id, depth) of the locks this process holds
_held_guard = threading.Lock()


class RunLockedError(MathWizardError):
    """Another process is writing the run folder."""


def _describe(info: Mapping[str, Any], run_dir: str) -> str:
    since = info.get("since", "?")
    who = f"`{info.get('command', '?')}` (pid {info.get('pid', '?')} on {info.get('host', '?')}, since {since})"
    return f"run folder {run_dir} is in use by {who}; wait for it to finish (--wait), or pass another --run-name"


def _holder_info(holder: str) -> dict[str, Any]:
    return {
        "holder": holder,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))[:200],
        "since": datetime.now(UTC).isoformat(timespec="seconds"),
        "heartbeat": time.time(),
    }


@contextmanager
def run_lock(
    run_dir: str,
    *,
    wait_s: float = 0.0,
    holder: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
    stale_s: float = STALE_S,
) -> Iterator[str]:
    """Hold the run folder's lock for the block; yields the holder id (pass it to stages run elsewhere).

    Args:
        run_dir: the run folder (a path or fsspec URL); created when missing.
        wait_s: how long to wait for another holder to finish (0: fail at once).
        holder: the id of a lock held by the run this call is part of (a dispatched stage): join it.
        storage_options: fsspec options for a URL.
        stale_s: remote locks only: a heartbeat older than this counts as a dead holder.

    Raises:
        RunLockedError: another run holds the folder (after `wait_s`).
    """
    key = str(run_dir).rstrip("/")
    with _held_guard:
        if key in _held:  # this process already holds it: a stage inside its pipeline
            token, depth = _held[key]
            _held[key] = (token, depth + 1)
            entered = True
        else:
            entered = False
    if entered:
        try:
            yield token
        finally:
            _release_depth(key)
        return

    if storage.is_remote(key):
        acquire = _RemoteLock(key, storage_options, stale_s)
    else:
        acquire = _LocalLock(storage.local_path(key))
    token = acquire.take(holder, wait_s, run_dir=key)
    with _held_guard:
        _held[key] = (token, 1)
    try:
        yield token
    finally:
        with _held_guard:
            _held.pop(key, None)
        acquire.release()


def _release_depth(key: str) -> None:
    with _held_guard:
        token, depth = _held[key]
        _held[key] = (token, depth - 1)


class _LocalLock:
    """`flock` on `<run>/.lock`; the file names the holder for the message a second run prints."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK_NAME
        self.file: IO[str] | None = None

    def take(self, holder: str | None, wait_s: float, *, run_dir: str) -> str:
        import fcntl

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            file = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 - held open for the lock's lifetime
        except OSError as exc:
            raise MathWizardError(
                f"cannot create the run folder's lock {self.path} ({exc.strerror or exc}); "
                "choose a writable --home (MATHWIZARD_HOME)"
            ) from None
        deadline = time.monotonic() + wait_s
        announced = False
        while True:
            try:
                fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                info = _read_json(self.path.read_text(encoding="utf-8", errors="replace"))
                if holder is not None and info.get("holder") == holder:
                    file.close()  # our own run holds it (a stage dispatched by the pipeline): work under it
                    return holder
                if time.monotonic() >= deadline:
                    file.close()
                    raise RunLockedError(_describe(info, run_dir)) from None
                if not announced:
                    log.info("waiting for %s", _describe(info, run_dir).split(";")[0])
                    announced = True
                time.sleep(_POLL_S)
        token = holder or uuid.uuid4().hex
        file.seek(0)
        file.truncate()
        file.write(json.dumps(_holder_info(token)) + "\n")
        file.flush()
        self.file = file
        return token

    def release(self) -> None:
        if self.file is not None:
            self.file.close()  # closing the descriptor releases the flock; the file stays, harmless
            self.file = None


class _RemoteLock:
    """`<run>/.lock` on an object store: the holder's id and a heartbeat, renewed by a background thread."""

    def __init__(self, run_dir: str, storage_options: Mapping[str, Any] | None, stale_s: float) -> None:
        self.url = storage.join(run_dir, LOCK_NAME)
        self.options = storage_options
        self.stale_s = stale_s
        self.info: dict[str, Any] = {}
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def _read(self) -> dict[str, Any]:
        fs, path = storage.filesystem(self.url, self.options)
        fs.invalidate_cache(path)
        try:
            return _read_json(fs.cat_file(path).decode("utf-8", errors="replace"))
        except FileNotFoundError:
            return {}

    def _write(self, info: dict[str, Any]) -> None:
        fs, path = storage.filesystem(self.url, self.options)
        fs.pipe_file(path, (json.dumps(info) + "\n").encode())

    def take(self, holder: str | None, wait_s: float, *, run_dir: str) -> str:
        deadline = time.monotonic() + wait_s
        while True:
            info = self._read()
            if holder is not None and info.get("holder") == holder:
                return holder  # joined: the pipeline that holds it renews the heartbeat
            fresh = info and time.time() - float(info.get("heartbeat", 0)) < self.stale_s
            if not fresh:
                if info:
                    log.warning("taking over the lock of %s: its holder stopped renewing it", run_dir)
                token = holder or uuid.uuid4().hex
                self.info = _holder_info(token)
                self._write(self.info)
                time.sleep(min(1.0, self.stale_s / 10))  # a competitor writing at the same moment: last one wins
                if self._read().get("holder") == token:
                    self._beat = threading.Thread(target=self._heartbeat, name="run-lock", daemon=True)
                    self._beat.start()
                    return token
                continue
            if time.monotonic() >= deadline:
                raise RunLockedError(_describe(info, run_dir))
            time.sleep(_POLL_S)

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.stale_s / 4):
            self.info["heartbeat"] = time.time()
            try:
                self._write(self.info)
            except Exception as exc:  # a missed beat is retried; the stage's own work matters more
                log.warning("could not renew the run lock %s: %s", self.url, exc)

    def release(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=5)
        try:
            if self._read().get("holder") == self.info.get("holder"):
                fs, path = storage.filesystem(self.url, self.options)
                fs.rm_file(path)
        except Exception as exc:
            log.warning("could not remove the run lock %s: %s", self.url, exc)


def _read_json(text: str) -> dict[str, Any]:
    try:
        data = json.loads(text or "{}")
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}
