"""The CLI's own Prefect API and terminal: Ctrl-C stops a stage at once, a killed CLI leaves no server behind, and
the live display advances on a terminal."""

from __future__ import annotations

import os
import pty
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mathwizard.testing import spawn_test_server
from tests.cli_runner import default_sigint

CLI = [sys.executable, "-c", "from mathwizard.cli import app; app()"]
KEY = "sk-runtime-test"


def cli_env(**extra: str) -> dict[str, str]:
    """The CLI as a user starts it: no Prefect API configured (it starts its own), the test key, offline."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    return {**env, "MATHWIZARD_TEACHER_API_KEY": KEY, "HF_HUB_OFFLINE": "1", **extra}


def children(pid: int) -> list[int]:
    """The live processes whose parent is `pid` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_for(condition, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return False


@pytest.fixture
def home(prepared: Path, tmp_path: Path) -> Path:
    """A home whose default run holds the prepared sample."""
    shutil.copytree(prepared, tmp_path / "runs" / "default" / "01-prepare")
    return tmp_path


def start_teach(home: Path, base_url: str) -> subprocess.Popen:
    args = ["teach", "--home", str(home), "--teacher", "openai", "--base-url", base_url, "--concurrency", "2"]
    return subprocess.Popen(
        [*CLI, *args],
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, like a shell's foreground job
        preexec_fn=default_sigint,
    )


def test_ctrl_c_stops_teach_at_once_with_one_line_and_sends_nothing_more(home: Path) -> None:
    with spawn_test_server(latency=1.0, api_key=KEY) as server:
        cli = start_teach(home, server.base_url)
        assert wait_for(lambda: server.requests >= 4, timeout=120), "the stage never started asking"
        servers = children(cli.pid)
        assert servers, "the CLI runs its own Prefect API server"
        os.killpg(cli.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole foreground group
        interrupted = time.monotonic()
        _, err = cli.communicate(timeout=60)
        took = time.monotonic() - interrupted
        sent = server.requests
        time.sleep(2.5)  # more than the 1 s a request takes: anything still running would have been sent by now
        assert server.requests == sent  # no new request after the interrupt
    assert cli.returncode == 130
    assert took < 15, f"Ctrl-C took {took:.1f} s"
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines == ["interrupted; re-run the same command to resume where it stopped"], err
    assert not any(alive(pid) for pid in servers)  # the API server went with the CLI
    assert not (home / "runs" / "default" / "02-teach" / "manifest.json").exists()


def test_an_error_inside_a_flow_is_one_line_with_no_prefect_output(home: Path) -> None:
    """A wrong key stops teach inside its flow: the console shows the error's one line and nothing of Prefect's
    (no traceback, no "Finished in state Failed", no events worker still sending at exit)."""
    with spawn_test_server(api_key=KEY) as server:
        env = cli_env(MATHWIZARD_TEACHER_API_KEY="sk-wrong")
        args = ["teach", "--home", str(home), "--teacher", "openai", "--base-url", server.base_url]
        failed = subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=300)
    lines = [line for line in failed.stderr.splitlines() if line.strip()]
    assert failed.returncode == 1 and len(lines) == 1, failed.stderr
    assert lines[0].startswith("error: ") and "key" in lines[0] and "sk-wrong" not in failed.stderr + failed.stdout


def test_a_killed_cli_leaves_no_api_server_running(home: Path) -> None:
    with spawn_test_server(latency=1.0, api_key=KEY) as server:
        cli = start_teach(home, server.base_url)
        assert wait_for(lambda: server.requests >= 2, timeout=120)
        servers = children(cli.pid)
        assert servers
        os.kill(cli.pid, signal.SIGKILL)
        cli.wait()
        # Linux ends the server when its parent dies (PR_SET_PDEATHSIG), even after kill -9.
        assert wait_for(lambda: not any(alive(pid) for pid in servers), timeout=30)


def test_the_progress_display_advances_on_a_terminal(home: Path, prefect_harness: None) -> None:
    """`mathwizard sft` in a pseudo-terminal: the SFT bar is redrawn step by step up to the total. (On the session's
    Prefect API: the CLI's own server is what the tests above are about, and starting one costs ~10 s.)"""
    from prefect.settings import PREFECT_API_URL

    from mathwizard.config import TeacherConfig
    from mathwizard.stages import teach

    run = home / "runs" / "default"
    teach.run(TeacherConfig(kind="rule"), run / "01-prepare", run / "02-teach", home / "cache")  # in-process: fast
    args = ["sft", "--home", str(home), "--max-steps", "4", "--batch-size", "1", "--grad-accum", "1"]
    primary, secondary = pty.openpty()
    cli = subprocess.Popen(
        [*CLI, *args],
        env=cli_env(COLUMNS="160", TERM="xterm", PREFECT_API_URL=str(PREFECT_API_URL.value())),
        stdin=secondary,
        stdout=secondary,
        stderr=secondary,
    )
    os.close(secondary)
    output = b""
    while True:
        ready, _, _ = select.select([primary], [], [], 1.0)
        if ready:
            try:
                chunk = os.read(primary, 65536)
            except OSError:  # the terminal closed: the CLI exited
                break
            if not chunk:
                break
            output += chunk
        elif cli.poll() is not None:
            break
    cli.wait(timeout=60)
    os.close(primary)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", output.decode(errors="replace"))
    assert cli.returncode == 0, text
    steps = [int(n) for n in re.findall(r"sft\s.*?(\d+)/4", text)]
    assert steps and steps[-1] == 4
    assert len({n for n in steps if n < 4}) >= 2, f"no intermediate frames: {steps}"  # it moved while training
    assert "loss" in text and "sft: 4 steps on 51 rows" in " ".join(text.split())
    assert "Finished in state" not in text and "Traceback" not in text  # a display, not logs
