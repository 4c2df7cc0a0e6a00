"""The launcher (`mathwizard/launch.py`): how many processes a stage starts, and what comes back from them: the
result, progress, log lines, one failure as its own one-line error, and no process left behind when the launcher
dies."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mathwizard import launch
from mathwizard.config import ModelConfig
from mathwizard.errors import ConfigError, DataError, MathWizardError
from tests.cli_runner import default_sigint


def test_world_size_from_model_gpus_and_the_visible_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    for name in ("LOCAL_RANK", "WORLD_SIZE", "RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert launch.world_size(ModelConfig()) == 4  # default: every visible GPU
    assert launch.world_size(ModelConfig(gpus=1)) == 1
    with pytest.raises(ConfigError, match=r"^model.gpus is 8 but 4 CUDA device\(s\) are visible; lower model.gpus"):
        launch.world_size(ModelConfig(gpus=8))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert launch.world_size(ModelConfig()) == 1  # no CUDA: one process
    assert launch.world_size(ModelConfig(gpus=2)) == 2  # ... unless asked: gloo processes (the tests)
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert launch.world_size(ModelConfig(gpus=2)) == 1  # a rank never launches again
    assert launch.current_world_size() == 2


def test_split_batch_keeps_the_effective_batch() -> None:
    assert launch.split_batch(8, 4, 2, "sft") == 2  # 8 x 4 = 8 x 2 x 2 GPUs
    assert launch.split_batch(4, 8, 8, "sft") == 1
    with pytest.raises(ConfigError, match=r"^dpo: the effective batch 2 x 4 = 8 cannot be split over 3 processes"):
        launch.split_batch(2, 4, 3, "dpo")


def test_two_ranks_return_rank_zeros_result(tmp_path: Path) -> None:
    seen: list[tuple[int, int]] = []
    result = launch.launch(
        "tests.launch_targets:answer",
        {"value": 21},
        nprocs=2,
        workdir=tmp_path,
        description="test",
        progress=lambda d, t, **m: seen.append((d, t)),
        progress_from="sum",
        total=2,
    )
    assert result == {"rank": 0, "value": 42}
    assert sorted(seen) == [(1, 2), (2, 2)]  # each rank's one item, added up
    assert list(tmp_path.iterdir()) == []  # the job files are gone


def test_a_ranks_failure_is_its_own_one_line_error_and_stops_the_others(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[tuple[int, int]] = []
    started = time.monotonic()
    with caplog.at_level(logging.INFO, logger="mathwizard"), pytest.raises(DataError) as info:
        launch.launch(
            "tests.launch_targets:count_then_fail",
            {"items": 3, "folder": str(tmp_path)},
            nprocs=2,
            workdir=tmp_path,
            description="test",
            progress=lambda d, t, **m: seen.append((d, t)),
        )
    assert str(info.value) == "x.parquet has no rows; run `mathwizard teach` first"
    assert time.monotonic() - started < 55  # rank 0 was stopped, not waited for (it sleeps 60 s)
    assert seen == [(1, 3), (2, 3), (3, 3)]  # rank 0's progress only
    relayed = [r.getMessage() for r in caplog.records if r.name == "mathwizard.tests"]
    assert sorted(relayed) == ["rank 0 counted 3 items", "rank 1 counted 3 items"]  # re-logged by the launcher


@pytest.mark.parametrize(
    ("code", "how"),
    [
        (3, "exited with code 3"),
        (-9, r"was killed by SIGKILL \(often the out-of-memory killer: lower the batch size\)"),
    ],
    ids=["exit", "killed"],
)
def test_a_rank_that_dies_without_a_word_is_named_not_the_rank_stopped_after_it(
    tmp_path: Path, code: int, how: str
) -> None:
    """Rank 1 ends silently (as under the OOM killer); torchrun then stops rank 0, which reports being stopped by a
    signal. The error names rank 1 and how it ended (from torchrun's summary), not rank 0's interruption."""
    started = time.monotonic()
    with pytest.raises(MathWizardError) as info:
        launch.launch("tests.launch_targets:die_then_wait", {"code": code}, nprocs=2, workdir=tmp_path, description="t")
    assert re.fullmatch(rf"t on several processes failed: rank 1 {how} without reporting an error \(its stderr: -vv\)",
                        str(info.value)), str(info.value)  # fmt: skip
    assert time.monotonic() - started < 55  # rank 0 was stopped, not waited for (it sleeps 60 s)


LAUNCHER = """
import sys
from mathwizard.launch import launch
launch("tests.launch_targets:wait_forever", {"folder": sys.argv[1]}, nprocs=2, workdir=sys.argv[1], description="t")
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_no_rank_outlives_its_launcher(tmp_path: Path, sig: signal.Signals) -> None:
    """Ctrl-C stops the process group; a launcher killed with -9 takes torchrun and the ranks with it (PDEATHSIG)."""
    launcher = subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, str(tmp_path)], cwd=Path(__file__).parents[1], preexec_fn=default_sigint
    )
    try:
        deadline = time.monotonic() + 120
        while len(list(tmp_path.glob("rank-*.pid"))) < 2:
            assert time.monotonic() < deadline and launcher.poll() is None, "the ranks did not start"
            time.sleep(0.2)
        pids = [int(p.read_text()) for p in tmp_path.glob("rank-*.pid")]
        launcher.send_signal(sig)
        launcher.wait(timeout=60)
        deadline = time.monotonic() + 30
        while any(_alive(pid) for pid in pids):
            assert time.monotonic() < deadline, f"ranks still running after {sig.name}: {pids}"
            time.sleep(0.2)
    finally:
        if launcher.poll() is None:
            launcher.kill()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie waits for its parent only
        return stat.read().split(")")[-1].split()[0] != "Z"
