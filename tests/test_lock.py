"""One writer per run folder: a second holder is refused at once (or waits), a killed holder frees the folder."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from mathwizard.errors import MathWizardError
from mathwizard.lock import LOCK_NAME, RunLockedError, _RemoteLock, run_lock

HOLD = textwrap.dedent(
    """
    import sys, time
    from mathwizard.lock import run_lock
    with run_lock(sys.argv[1], holder=sys.argv[3] if len(sys.argv) > 3 else None) as token:
        print(token, flush=True)
        time.sleep(float(sys.argv[2]))
    """
)


def hold(run_dir: Path, seconds: float, holder: str | None = None) -> tuple[subprocess.Popen, str]:
    """A child process holding the run folder's lock for `seconds`; returns it and its holder id."""
    args = [sys.executable, "-c", HOLD, str(run_dir), str(seconds), *([holder] if holder else [])]
    child = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    token = child.stdout.readline().strip()  # printed once the lock is held
    assert token, "the child never took the lock"
    return child, token


def test_a_second_writer_is_refused_with_the_holders_name(tmp_path: Path) -> None:
    child, _ = hold(tmp_path / "run", 30)
    try:
        with pytest.raises(RunLockedError) as refused, run_lock(str(tmp_path / "run")):
            pytest.fail("took a lock another process holds")
        message = str(refused.value)
        assert f"pid {child.pid}" in message and "--wait" in message and "\n" not in message
    finally:
        child.kill()
        child.wait()


def test_a_killed_holder_frees_the_folder_at_once(tmp_path: Path) -> None:
    child, _ = hold(tmp_path / "run", 30)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert (tmp_path / "run" / LOCK_NAME).is_file()  # the file stays; the kernel released the flock
    with run_lock(str(tmp_path / "run")) as token:
        assert token


def test_waiting_takes_the_lock_when_the_holder_finishes(tmp_path: Path) -> None:
    child, _ = hold(tmp_path / "run", 1.5)
    started = time.monotonic()
    with run_lock(str(tmp_path / "run"), wait_s=60) as token:
        assert token and child.poll() is not None  # it waited for the holder's exit
    assert time.monotonic() - started < 60
    child.wait()


def test_reentrant_within_a_process_and_joinable_by_the_holders_id(tmp_path: Path) -> None:
    run = str(tmp_path / "run")
    with run_lock(run) as outer:
        with run_lock(run) as inner:  # a stage inside its pipeline
            assert inner == outer
        child, token = hold(tmp_path / "run", 0, holder=outer)  # a dispatched stage joins the pipeline's lock
        assert token == outer
        assert child.wait() == 0
        stranger = subprocess.run([sys.executable, "-c", HOLD, run, "0"], capture_output=True, text=True, timeout=60)
        assert stranger.returncode != 0 and "RunLockedError" in stranger.stderr
    with run_lock(run):  # released when the outer block ended
        pass


def test_an_unwritable_home_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(MathWizardError) as failed, run_lock(str(blocker / "runs" / "x")):
        pass
    assert "--home" in str(failed.value) and "\n" not in str(failed.value)


def test_a_read_only_home_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A read-only mount (root ignores chmod, so the mount's errno is raised where the folder is made)."""

    def read_only(self: Path, *args: object, **kwargs: object) -> None:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))

    monkeypatch.setattr(Path, "mkdir", read_only)
    with pytest.raises(MathWizardError) as failed, run_lock(str(tmp_path / "runs" / "x")):
        pass
    assert "Read-only file system" in str(failed.value) and "--home" in str(failed.value)


@pytest.mark.parametrize("where", ["under-a-file", "proc"])
def test_the_cli_with_an_unusable_home_prints_one_line(tmp_path: Path, where: str) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    home = blocker / "home" if where == "under-a-file" else Path("/proc") / f"mathwizard-{os.getpid()}"
    cli = [sys.executable, "-c", "from mathwizard.cli import app; app()"]
    failed = subprocess.run([*cli, "prepare", "--home", str(home)], capture_output=True, text=True, timeout=120)
    lines = [line for line in failed.stderr.splitlines() if line.strip()]
    assert failed.returncode == 1 and len(lines) == 1, failed.stderr
    assert "writable --home" in lines[0]


def test_remote_lock_refuses_a_fresh_holder_and_takes_over_a_stale_one() -> None:
    pytest.importorskip("fsspec")
    url = "memory://bucket/runs/remote"
    first = _RemoteLock(url, None, stale_s=0.4)
    token = first.take(None, 0, run_dir=url)
    try:
        with pytest.raises(RunLockedError, match="in use"):
            _RemoteLock(url, None, stale_s=0.4).take(None, 0, run_dir=url)
        assert _RemoteLock(url, None, stale_s=0.4).take(token, 0, run_dir=url) == token  # a dispatched stage joins
    finally:
        first._stop.set()  # the holder dies without releasing: its heartbeat stops
        first._beat.join()
    time.sleep(0.6)
    second = _RemoteLock(url, None, stale_s=0.4)
    assert second.take(None, 0, run_dir=url) != token
    second.release()


def test_a_second_command_on_the_same_run_is_one_line_and_exit_1(tmp_path: Path) -> None:
    """Two runs on the same home and run name: the second stops before Prefect starts, naming the first."""
    home = tmp_path / "home"
    child, _ = hold(home / "runs" / "default", 60)
    try:
        cli = [sys.executable, "-c", "from mathwizard.cli import app; app()"]
        second = subprocess.run([*cli, "prepare", "--home", str(home)], capture_output=True, text=True, timeout=120)
        lines = [line for line in second.stderr.splitlines() if line.strip()]
        assert second.returncode == 1 and len(lines) == 1, second.stderr
        assert "in use by" in lines[0] and f"pid {child.pid}" in lines[0]
        assert not (home / "runs" / "default" / "01-prepare").exists()  # nothing was written
    finally:
        child.kill()
        child.wait()
