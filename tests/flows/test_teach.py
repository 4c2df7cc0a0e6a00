"""The teach flow: the stage in a Prefect run with live progress and the failures table; the task retries what
can recover (an API outage) and not what cannot (a wrong key)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import flows.teach
from mathwizard.config import Settings, load_settings
from mathwizard.errors import TeacherError, TransientError
from mathwizard.stages import teach
from mathwizard.testing import OpenAITestServer
from tasks import stages
from tests.flows.artifacts import of_run, table
from tests.teacher.helpers import unique_items


def settings_for(home: Path, server: OpenAITestServer | None = None, **teacher: Any) -> Settings:
    values: dict[str, Any] = {"backoff_s": 0.005, "backoff_max_s": 0.02, "rpm": 1_000_000}
    if server is not None:
        values.update(kind="openai", base_url=server.base_url, model="test-teacher", concurrency=2)
    else:
        values.update(kind="rule")
    return load_settings(home=str(home), teacher={**values, **teacher})


def test_flow_writes_the_stage_with_artifacts(prefect_harness: None, prepared: Path, tmp_path: Path) -> None:
    state = flows.teach.teach_flow(settings_for(tmp_path), data=str(prepared), return_state=True)
    result = state.result()
    assert teach.Report.of(result).written == 60 and result["stage"] == "teach"
    assert (tmp_path / "runs/default/02-teach/train.parquet").is_file()  # the default out folder
    found, tasks = of_run(state)
    assert tasks == ["Completed"]
    assert float(found["teach-progress"].data) == 100.0
    assert found["teach-progress"].description == "teach (all): items done: 60 of 60"
    assert table("teach-failures") == [{"reason": "(none)", "items": 0}]
    assert found["teach-failures"].description == (
        "teach (rule: rule): 60 written, 0 failed of 60; 0 API calls, 0 cache hits, 0 retries"
    )

    again = flows.teach.teach_flow(settings_for(tmp_path), data=str(prepared), return_state=True)
    assert again.result() == result
    found, _ = of_run(again)
    assert "teach-progress" not in found  # skipped by its manifest: no progress to show


def test_a_wrong_key_costs_one_request_and_no_retry(
    prefect_harness: None, prepared: Path, server: OpenAITestServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MATHWIZARD_TEACHER_API_KEY", "sk-wrong-Yy3Kd9Qp2Rt7Wm5")
    monkeypatch.setattr(flows.teach, "teach", stages.teach.with_options(retry_delay_seconds=0))
    with pytest.raises(TeacherError, match="rejected the API key"):
        flows.teach.teach_flow(settings_for(tmp_path, server, concurrency=8), data=str(prepared))
    assert server.requests == 1  # the first request goes alone; a permanent error is not retried by the task


def test_an_outage_is_retried_once_by_the_task_then_a_rerun_resumes(
    prefect_harness: None, prepared: Path, server: OpenAITestServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(flows.teach, "teach", stages.teach.with_options(retry_delay_seconds=0))
    settings = settings_for(tmp_path, server, request_retries=1)
    server.fail_for(3600, "503")  # down from the start
    with pytest.raises(TransientError, match="did not answer after 1 retries"):
        flows.teach.teach_flow(settings, data=str(prepared))
    # two task attempts (teach: retries=1), each probing with one item: 1 request + 1 retry
    assert server.requests == 2 * 2
    out = Path(settings.stage_dir("teach"))
    assert not (out / "manifest.json").exists()

    server.clear()
    server.reset_counts()
    result = flows.teach.teach_flow(settings, data=str(prepared))
    assert teach.Report.of(result).written == 60 and server.requests == unique_items(prepared)


def test_too_many_failures_still_show_the_failures_table(
    prefect_harness: None, prepared: Path, server: OpenAITestServer, tmp_path: Path
) -> None:
    server.fail_next(3, "wrong_answer")  # one at a time: the first three items get a wrong answer
    settings = settings_for(tmp_path, server, concurrency=1, max_attempts=1)
    with pytest.raises(TeacherError, match=r"^3 / 60 items failed"):
        flows.teach.teach_flow(settings, data=str(prepared))
    assert table("teach-failures") == [{"reason": "answer_mismatch", "items": 3}]  # the report came before the error


def test_batch_mode_waits_between_task_attempts_and_shows_the_batches(
    prefect_harness: None, prepared: Path, server: OpenAITestServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each attempt polls for at most batch_wait_s, then BatchPending: the task's retry resumes the same batch."""
    monkeypatch.setattr(flows.teach, "teach_batch", stages.teach_batch.with_options(retry_delay_seconds=0))
    server.configure(batch_chunk=20)  # 20 requests answered per status check: several attempts
    poll = {"batch_poll_s": 0.02, "batch_poll_max_s": 0.02, "batch_wait_s": 0.02}
    state = flows.teach.teach_flow(settings_for(tmp_path, server, mode="batch", **poll), data=str(prepared),
                                   return_state=True)  # fmt: skip
    report = teach.Report.of(state.result())
    assert (report.written, report.mode, len(report.batch_ids)) == (60, "batch", 1)
    assert server.calls["files.create"] == server.calls["batches.create"] == 1
    found, tasks = of_run(state)
    assert tasks == ["Completed"] and server.calls["batches.retrieve"] >= 4
    assert found["teach-progress"].description.startswith("teach (all, batch): items done: 60 of 60")
    assert table("teach-batches") == [
        {"id": report.batch_ids[0], "name": report.batches[0].name, "status": "completed", "requests": 60,
         "completed": 60, "failed": 0, "note": ""}
    ]  # fmt: skip


def test_batch_progress_shows_the_request_counts_and_status(
    prepared: Path, server: OpenAITestServer, tmp_path: Path
) -> None:
    """The stage's progress reports carry the batches' request counts and statuses (the artifact shows them)."""
    seen: list[dict[str, float]] = []
    server.configure(batch_chunk=30)
    cfg = settings_for(tmp_path, server, mode="batch", batch_poll_s=0.005, batch_poll_max_s=0.01, batch_wait_s=None)
    teach.run(cfg.teacher, prepared, tmp_path / "out", tmp_path / "cache", progress=lambda d, t, **m: seen.append(m))
    assert {
        "requests_total": 60.0,
        "requests_completed": 30.0,
        "requests_failed": 0.0,
        "batches_in_progress": 1.0,
    } in seen
