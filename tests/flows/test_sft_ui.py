"""SFT's live progress in the Prefect UI while it trains: the artifact moves mid-run, and headless Chromium renders it
(slow: a real Prefect server, a training run of a few dozen steps, a browser)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.flows.chromium import Browser, rendered

pytestmark = pytest.mark.slow

STEPS = 1000  # long enough to still be training while the browser renders (it is stopped then)


@pytest.fixture
def server(tmp_path_factory: pytest.TempPathFactory):
    from deployments.localstack import LocalStack

    stack = LocalStack(home=tmp_path_factory.mktemp("prefect"), env={"HF_HUB_OFFLINE": "1"})
    try:
        stack.start_server()
        yield stack
    finally:
        stack.stop()


def _progress(server) -> tuple[float, str] | None:
    """The latest `sft-progress` artifact: (percent, description), or None before the first report."""
    found = server.api("POST", "/artifacts/latest/filter", json={"artifacts": {"key": {"any_": ["sft-progress"]}}})
    rows = found.json() if found.status_code == 200 else []
    if not rows:
        return None
    return float(rows[0]["data"]), rows[0]["description"]


def test_the_ui_shows_sft_progress_while_it_trains(server, prepared: Path, tmp_path: Path) -> None:
    browser = Browser(tmp_path / "profile", "1600,1000", budget_ms=20_000)
    home = tmp_path / "home"
    shutil.copytree(prepared, home / "runs" / "default" / "01-prepare")
    env = {**os.environ, "PREFECT_API_URL": server.api_url, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cli = [sys.executable, "-c", "from mathwizard.cli import app; app()"]
    subprocess.run([*cli, "teach", "--home", str(home), "--teacher", "rule"], env=env, check=True, timeout=300)
    args = ["sft", "--home", str(home), "--max-steps", str(STEPS), "--batch-size", "1", "--grad-accum", "1"]
    training = subprocess.Popen([*cli, *args, "--save-steps", "1000"], env=env, stderr=subprocess.DEVNULL)
    try:
        midway = None
        deadline = time.monotonic() + 600
        while midway is None and training.poll() is None and time.monotonic() < deadline:
            seen = _progress(server)
            if seen is not None and seen[0] > 0:
                midway = seen
            time.sleep(0.5)
        assert midway is not None, "no progress artifact between the first and the last step"
        percent, description = midway
        assert re.match(rf"sft: optimizer steps: \d+ of {STEPS:,} · loss ", description), description

        url = f"{server.ui_url}/artifacts/key/sft-progress"
        text = browser.text(url)
        data = browser.screenshot(url, "sft-progress-mid-run.png", tmp_path)
        assert "sft-progress" in text and "sft: optimizer steps" in text, "the artifact is not on the rendered page"
        assert rendered(data)
        assert training.poll() is None, "training ended before the page was rendered: not a mid-run view"
        later = _progress(server)
        assert later is not None and later[0] > percent  # still moving
    finally:
        training.kill()
        training.wait()
