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
