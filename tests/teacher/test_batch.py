"""Teach in batch mode against the test server's Batch API: the same output as online, batches within the limits,
replies validated and re-asked as online, expired / failed batches and malformed output, a wrong key, the cost in
the report, a bounded wait (BatchPending) and, with real `kill -9`s, a re-run that resumes the same batch at every
step without a second upload, batch or billed reply."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from mathwizard.errors import BatchPending, TeacherError
from mathwizard.stages import teach
from mathwizard.teacher.cache import ReplyCache
from mathwizard.teacher.journal import BatchJournal
from mathwizard.testing import OpenAITestServer
from tests.teacher.helpers import api_config, unique_items

KILLED_RUN = """
import sys
from pathlib import Path
from mathwizard.config import TeacherConfig
from mathwizard.stages import teach
cfg = TeacherConfig(
    kind="openai", base_url=sys.argv[1], model="test-teacher", mode="batch", batch_poll_s=0.01, batch_poll_max_s=0.02,
    batch_wait_s=None, backoff_s=0.005, backoff_max_s=0.02,
)
teach.run(cfg, Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]))
"""


def batch_config(server: OpenAITestServer, **overrides: Any):
    values: dict[str, Any] = {"mode": "batch", "batch_poll_s": 0.005, "batch_poll_max_s": 0.02, "batch_wait_s": None}
    return api_config(server, **{**values, **overrides})


def rows(out: Path) -> dict[str, list[tuple[str, str]]]:
    """(id, solution) of every written row, by split: what SFT trains on."""
    found = {}
    for split in ("train", "val", "test"):
        table = pq.read_table(out / f"{split}.parquet", columns=["id", "solution"])
        found[split] = sorted(zip(table.column("id").to_pylist(), table.column("solution").to_pylist(), strict=True))
    return found


def calls(server: OpenAITestServer, route: str) -> int:
    return server.calls.get(route, 0)


# ------------------------------------------------------------------------------------------------ happy path
def test_batch_mode_writes_what_online_writes(prepared: Path, server: OpenAITestServer, tmp_path: Path) -> None:
    unique = unique_items(prepared)
    batch = teach.run(batch_config(server), prepared, tmp_path / "batch", tmp_path / "cache-batch")
    done = teach.Report.of(batch)
    assert (done.written, done.failed, done.mode, done.api_calls, done.batch_requests) == (60, 0, "batch", 0, unique)
    assert server.calls == {"files.create": 1, "batches.create": 1, "batches.retrieve": 3, "files.content": 1}
    # validating -> in_progress -> finalizing -> completed: three status checks; one output file, no error file
    assert len(done.batch_ids) == 1 and done.batches[0].status == "completed" and done.batches[0].completed == unique
    assert done.tokens_by_mode["batch"].prompt == server.billed["batch_prompt_tokens"] > 0
    assert done.tokens_by_mode["online"].prompt == 0 and done.estimated_cost_usd is None  # prices unknown (0)

    online = teach.run(api_config(server), prepared, tmp_path / "online", tmp_path / "cache-online")
    assert teach.Report.of(online).mode == "online" and server.billed["online_requests"] == unique
    assert rows(tmp_path / "batch") == rows(tmp_path / "online")


def test_a_rerun_after_completion_makes_no_api_call(prepared: Path, server: OpenAITestServer, tmp_path: Path) -> None:
    cfg = batch_config(server)
    first = teach.run(cfg, prepared, tmp_path / "out", tmp_path / "cache")
    before = server.calls
    assert teach.run(cfg, prepared, tmp_path / "out", tmp_path / "cache") == first  # skipped by its manifest
    (tmp_path / "out" / "manifest.json").unlink()  # the stage redone: every reply comes from the cache
    again = teach.Report.of(teach.run(cfg, prepared, tmp_path / "out", tmp_path / "cache"))
    assert (again.written, again.cache_hits, again.batch_requests, again.batch_ids) == (60, 60, 0, [])
    assert server.calls == before


def test_online_and_batch_share_the_cache(prepared: Path, server: OpenAITestServer, tmp_path: Path) -> None:
    """A grown dataset (here: the rows past the first 10 of each split) pays only for its new rows, in either mode."""
    teach.run(api_config(server, limit=10), prepared, tmp_path / "week1", tmp_path / "cache")
    asked_online = server.billed["online_requests"]
    done = teach.Report.of(teach.run(batch_config(server), prepared, tmp_path / "week2", tmp_path / "cache"))
    assert done.cache_hits == asked_online and done.batch_requests == unique_items(prepared) - asked_online
    assert done.written == 60


def test_requests_are_split_within_the_limits(prepared: Path, server: OpenAITestServer, tmp_path: Path) -> None:
    unique = unique_items(prepared)
    cfg = batch_config(server, batch_max_requests=25)
    done = teach.Report.of(teach.run(cfg, prepared, tmp_path / "out", tmp_path / "cache"))
    assert len(done.batch_ids) == -(-unique // 25) and calls(server, "files.create") == len(done.batch_ids)
    assert max(line.requests for line in done.batches) == 25 and done.written == 60

    cache2, out2 = tmp_path / "cache2", tmp_path / "out2"
    small = teach.Report.of(teach.run(batch_config(server, batch_max_bytes=20_000), prepared, out2, cache2))
    assert len(small.batches) > 1 and small.written == 60 and sum(line.requests for line in small.batches) == unique
    files = [f for f in server.plan.files.values() if f["meta"]["purpose"] == "batch"]
    assert max(len(f["content"]) for f in files[-len(small.batches) :]) <= 20_000


# ------------------------------------------------------------------------------------------------ re-asks
@pytest.mark.parametrize("reask", ["batch", "online"])
def test_invalid_replies_are_asked_again_with_the_reason(
    prepared: Path, server: OpenAITestServer, tmp_path: Path, reask: str
) -> None:
    server.fail_next(3, "wrong_answer")  # the first three lines of the first batch
    cfg = batch_config(server, batch_reask=reask)
    done = teach.Report.of(teach.run(cfg, prepared, tmp_path / "out", tmp_path / "cache"))
    unique = unique_items(prepared)
    assert (done.written, done.failed) == (60, 0)
    if reask == "batch":
        assert calls(server, "batches.create") == 2 and done.batch_requests == unique + 3
        assert [line.requests for line in done.batches] == [unique, 3]
    else:
        assert calls(server, "batches.create") == 1 and done.api_calls == 3 and done.tokens_by_mode["online"].prompt
    reasked = list(server.plan.history)  # online requests only; the follow-up batch's file holds the others
    if reask == "batch":
        last = list(server.plan.files.values())
        content = [f["content"] for f in last if f["meta"]["purpose"] == "batch"][-1].decode()
        reasked = [json.loads(line)["body"]["messages"] for line in content.splitlines()]
    assert len(reasked) == 3
    assert all(m[-2]["role"] == "assistant" and "final answer differs" in m[-1]["content"] for m in reasked)


def test_malformed_output_lines_are_asked_again_never_written(
    prepared: Path, server: OpenAITestServer, tmp_path: Path
) -> None:
    server.configure(malformed_lines=2)  # the first two output lines cut in half
    server.fail_after(10, "bad_completion", n=2)  # lines 11 and 12: 200 without choices
    done = teach.Report.of(teach.run(batch_config(server), prepared, tmp_path / "out", tmp_path / "cache"))
    assert (done.written, done.failed) == (60, 0)
    assert [line.requests for line in done.batches] == [unique_items(prepared), 4]  # 2 cut lines + 2 bad bodies
    assert "2 malformed output lines" in done.batch_events[0]
    with ReplyCache.in_dir(tmp_path / "cache") as cache:
        assert len(cache) == unique_items(prepared)


@pytest.mark.parametrize("fault", ["expired", "cancelled"])
def test_an_expired_or_cancelled_batch_keeps_its_partial_output(
    prepared: Path, server: OpenAITestServer, tmp_path: Path, fault: str
) -> None:
    unique = unique_items(prepared)
    server.fail_batches([fault])  # answers half its requests, then expires or is cancelled
    done = teach.Report.of(teach.run(batch_config(server), prepared, tmp_path / "out", tmp_path / "cache"))
    assert (done.written, done.failed) == (60, 0)
    first, second = done.batches
    assert (first.status, first.completed) == (fault, unique // 2)
    assert (second.status, second.requests) == ("completed", unique - unique // 2)
    assert server.billed["batch_requests"] == unique  # the kept half is never asked again
    assert done.batch_events == [
        f"batch {first.id} {fault}: {unique // 2} of {unique} requests done; {unique - unique // 2} without a"
        " usable reply asked again"
    ]


def test_a_failed_batch_is_reported_and_sent_again(prepared: Path, server: OpenAITestServer, tmp_path: Path) -> None:
    server.fail_batches(["failed"])
    done = teach.Report.of(teach.run(batch_config(server), prepared, tmp_path / "out", tmp_path / "cache"))
    assert done.written == 60 and [line.status for line in done.batches] == ["failed", "completed"]
    assert "injected validation failure" in done.batch_events[0]


def test_failed_requests_are_retried_then_reported(prepared: Path, server: OpenAITestServer, tmp_path: Path) -> None:
    """A 503 line is asked again in the next batch, up to request_retries times; then the item fails (not cached)."""
    server.fail_next(4, "503")  # the first 4 lines of the batch: error-file lines
    cfg = batch_config(server, request_retries=0, max_failed_fraction=1.0)
    done = teach.Report.of(teach.run(cfg, prepared, tmp_path / "out", tmp_path / "cache"))
    assert (done.failed, done.failures_by_reason) == (4, {"http_503": 4})
    assert done.stopped is None and len(done.batches) == 1
    with ReplyCache.in_dir(tmp_path / "cache") as cache:
        assert cache.failure_count() == 0  # a re-run asks them again


# ------------------------------------------------------------------------------------------------ errors
def test_a_wrong_key_is_one_line_and_one_request(
    prepared: Path, server: OpenAITestServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MATHWIZARD_TEACHER_API_KEY", "sk-wrong-Yy3Kd9Qp2Rt7Wm5")
    with pytest.raises(TeacherError) as info:
        teach.run(batch_config(server), prepared, tmp_path / "out", tmp_path / "cache")
    message = str(info.value)
    assert "rejected the API key" in message and "\n" not in message and "Yy3Kd9Qp2Rt7Wm5" not in message
    assert server.calls == {"files.create": 1}
    assert teach.Report.model_validate_json((tmp_path / "out" / "report.json").read_text()).stopped.startswith(
        "TeacherError"
    )


def test_a_batch_recorded_but_never_uploaded_is_uploaded_by_the_rerun(
    prepared: Path, server: OpenAITestServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A wrong key stops the run after the journal recorded the batch: the re-run looks for the upload, finds none
    and uploads it; with its request file deleted as well, the batch is forgotten and its items sent in a new one."""
    for deleted in (False, True):
        cache_dir, out = tmp_path / f"cache-{deleted}", tmp_path / f"out-{deleted}"
        server.plan.files.clear()  # the same requests make the same file name: no finding the last loop's upload
        server.plan.batches.clear()
        monkeypatch.setenv("MATHWIZARD_TEACHER_API_KEY", "sk-wrong-Yy3Kd9Qp2Rt7Wm5")
        with pytest.raises(TeacherError):
            teach.run(batch_config(server), prepared, out, cache_dir)
        monkeypatch.setenv("MATHWIZARD_TEACHER_API_KEY", server.plan.api_key)
        if deleted:
            for path in (cache_dir / "teacher-batches").glob("*.jsonl"):
                path.unlink()
        server.reset_counts()
        done = teach.Report.of(teach.run(batch_config(server), prepared, out, cache_dir))
        assert done.written == 60 and calls(server, "files.list") == 1
        assert calls(server, "files.create") == calls(server, "batches.create") == 1
        assert done.batch_requests == (unique_items(prepared) if deleted else 0)


def test_a_bounded_wait_stops_with_batch_pending_then_resumes(
    prepared: Path, server: OpenAITestServer, tmp_path: Path
) -> None:
    server.configure(batch_chunk=10)  # 10 requests answered per status check
    cfg = batch_config(server, batch_wait_s=0.05, batch_poll_s=0.05, batch_poll_max_s=0.05)
    with pytest.raises(BatchPending, match=r"1 teacher batch\(es\) still running .* re-run to collect them"):
        teach.run(cfg, prepared, tmp_path / "out", tmp_path / "cache")
    stopped = teach.Report.model_validate_json((tmp_path / "out" / "report.json").read_text())
    assert stopped.stopped.startswith("BatchPending") and stopped.not_attempted == 60 and len(stopped.batch_ids) == 1
    assert not (tmp_path / "out" / "manifest.json").exists()

    done = teach.Report.of(teach.run(batch_config(server), prepared, tmp_path / "out", tmp_path / "cache"))
    assert done.written == 60 and done.batch_ids == stopped.batch_ids and done.batch_requests == 0
    assert calls(server, "files.create") == calls(server, "batches.create") == 1


def test_cost_is_estimated_from_the_prices(prepared: Path, server: OpenAITestServer, tmp_path: Path) -> None:
    cfg = batch_config(server, price_input_per_mtok=0.15, price_output_per_mtok=0.60)
    done = teach.Report.of(teach.run(cfg, prepared, tmp_path / "out", tmp_path / "cache"))
    billed = server.billed
    expected = 0.5 * (billed["batch_prompt_tokens"] * 0.15 + billed["batch_completion_tokens"] * 0.60) / 1e6
    assert done.estimated_cost_usd == pytest.approx(expected, abs=1e-8) and expected > 0


# ------------------------------------------------------------------------------------------------ kill -9
def _files_stored(server: OpenAITestServer) -> bool:
    return any(f["meta"]["purpose"] == "batch" for f in server.plan.files.values())


KILL_POINTS: dict[str, tuple[dict[str, Any], Callable[[OpenAITestServer], bool]]] = {
    # the upload stored, its reply (the file id) never read
    "after the upload": ({"holds": {"files.create": 60}}, _files_stored),
    # the batch created, its id never read
    "after the batch is created": ({"holds": {"batches.create": 60}}, lambda s: bool(s.plan.batches)),
    # in the middle of the batch's life: one request answered per status check (60 checks: a wide window)
    "while polling": ({"batch_chunk": 1}, lambda s: s.calls.get("batches.retrieve", 0) >= 4),
    # the batch ended; its output file is being downloaded
    "while downloading": ({"holds": {"files.content": 60}}, lambda s: s.calls.get("files.content", 0) >= 1),
}


@pytest.mark.parametrize("point", KILL_POINTS)
def test_kill_9_then_resume_the_same_batch(
    point: str, prepared: Path, server: OpenAITestServer, tmp_path: Path
) -> None:
    unique = unique_items(prepared)
    options, reached = KILL_POINTS[point]
    server.configure(**options)
    out, cache_dir = tmp_path / "out", tmp_path / "cache"
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_RUN, server.base_url, str(prepared), str(out), str(cache_dir)],
        env=os.environ.copy(),  # the API key comes from the environment (the `api_key` fixture)
    )
    try:
        deadline = time.monotonic() + 120
        while not reached(server) and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait()
    assert child.returncode == -signal.SIGKILL, f"the run ended before the kill point ({point})"
    with BatchJournal.in_dir(cache_dir) as journal:
        assert len(journal.open_batches()) == 1  # recorded before the upload, not collected

    server.configure(holds={}, batch_chunk=None)
    done = teach.Report.of(teach.run(batch_config(server), prepared, out, cache_dir))
    assert (done.written, done.failed, done.batch_requests) == (60, 0, 0)  # nothing new was put into a batch
    assert calls(server, "files.create") == 1 and calls(server, "batches.create") == 1
    assert server.billed == {  # every reply billed once; no online request at all
        "batch_requests": unique,
        "batch_prompt_tokens": done.tokens_by_mode["batch"].prompt,
        "batch_completion_tokens": done.tokens_by_mode["batch"].completion,
    }
    assert calls(server, "chat.completions") == 0
    with BatchJournal.in_dir(cache_dir) as journal:
        assert journal.open_batches() == []
    assert not list((cache_dir / "teacher-batches").glob("*.jsonl"))  # the request file goes once collected
