"""The teach flow and command: chunk tasks, artifacts, one request for a wrong key, resume after an outage."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from typer.testing import CliRunner

import flows.teach
from mathwizard.cli import app
from mathwizard.config import Settings, load_settings
from mathwizard.errors import TeacherError, TransientError
from mathwizard.teacher.cache import ReplyCache
from mathwizard.testing import OpenAITestServer
from tasks import teach as teach_tasks
from tests.teacher.helpers import unique_items

runner = CliRunner()


def latest(key: str) -> Any:
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    return max(found, key=lambda a: a.created)


def settings_for(home: Path, server: OpenAITestServer | None = None, **teacher: Any) -> Settings:
    values: dict[str, Any] = {"chunk_size": 10, "backoff_s": 0.005, "backoff_max_s": 0.02, "rpm": 1_000_000}
    if server is not None:
        values.update(kind="openai", base_url=server.base_url, model="test-teacher", concurrency=2)
    else:
        values.update(kind="rule")
    return load_settings(home=str(home), teacher={**values, **teacher})


def test_task_policy() -> None:
    assert (teach_tasks.teach.name, teach_tasks.teach.retries) == ("teach", 1)
    assert (teach_tasks.teach_chunk.name, teach_tasks.teach_chunk.retries) == ("teach-chunk", 1)
    assert teach_tasks.teach_chunk.retry_condition_fn is not None
    assert teach_tasks.teach_assemble.retries == 0


def test_flow_writes_the_stage_with_artifacts(prefect_harness: None, prepared: Path, tmp_path: Path) -> None:
    result = flows.teach.teach_flow(settings_for(tmp_path), data=str(prepared))
    assert result["counts"]["written"] == 60 and result["stage"] == "teach"
    assert (tmp_path / "runs/default/02-teach/train.parquet").is_file()  # the default out folder
    assert float(latest("teach-progress").data) == 100.0
    table = latest("teach-failures")
    assert json.loads(table.data) == [{"reason": "(none)", "items": 0}] and "60 written" in table.description


def test_wrong_key_costs_one_request_across_parallel_chunks(
    prefect_harness: None, prepared: Path, server: OpenAITestServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MATHWIZARD_TEACHER_API_KEY", "sk-wrong-Yy3Kd9Qp2Rt7Wm5")
    with pytest.raises(TeacherError, match="rejected the API key"):
        flows.teach.teach_flow(settings_for(tmp_path, server, concurrency=8), data=str(prepared))
    assert server.requests == 1  # 6 chunks, 2 running at once, one shared first request


def test_flow_resumes_from_the_cache_after_an_outage(
    prefect_harness: None, prepared: Path, server: OpenAITestServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(flows.teach, "teach_chunk", teach_tasks.teach_chunk.with_options(retries=0))
    settings = settings_for(tmp_path, server, request_retries=1)
    server.fail_after(20, "503")  # the API goes down after 20 good replies
    with pytest.raises(TransientError, match="items in a row"):
        flows.teach.teach_flow(settings, data=str(prepared))
    with ReplyCache.in_dir(Path(settings.cache_dir)) as cache:
        cached = len(cache)
    assert cached == 20  # every good reply was kept
    assert server.outcomes["ok"] == 20
    # then at most 10 active items (max(4 x 2, 2 + 8)) x 2 tries before the breaker trips; later chunks send nothing
    assert server.outcomes["503"] <= 20

    server.clear()
    server.reset_counts()
    result = flows.teach.teach_flow(settings, data=str(prepared))  # a plain re-run
    assert result["counts"]["written"] == 60 and result["counts"]["cache_hits"] == cached
    assert server.requests == result["counts"]["api_calls"] == unique_items(prepared) - cached  # only what was missing


def test_cli_runs_against_the_server_under_faults(
    prefect_harness: None, prepared: Path, server: OpenAITestServer, tmp_path: Path
) -> None:
    server.configure(faults={"503": 0.1, "drop": 0.05, "wrong_answer": 0.1}, seed=5)
    out = tmp_path / "taught"
    args = ["teach", "--home", str(tmp_path), "--data", str(prepared), "--out", str(out), "--teacher", "openai"]
    args += ["--base-url", server.base_url, "--model", "test-teacher", "--concurrency", "4", "--rpm", "60000"]
    result = runner.invoke(app, args, env={"MATHWIZARD_TEACHER__BACKOFF_S": "0.005"})
    assert result.exit_code == 0, result.output
    assert "taught 60 of 60 items with openai (test-teacher)" in result.output
    assert json.loads((out / "report.json").read_text())["written"] == 60


def test_cli_passes_every_flag_to_the_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen: dict[str, Any] = {}

    def fake_flow(settings: Settings, data: str | None, out: str | None) -> dict[str, Any]:
        seen.update(settings=settings, data=data, out=out)
        return {"counts": {"items": 3, "written": 3}, "extra": {"teacher": "rule"}, "fingerprint": "f" * 64}

    monkeypatch.setattr(flows.teach, "teach_flow", fake_flow)
    args = ["teach", "--home", str(tmp_path), "--data", "in", "--out", "o", "--split", "val", "--teacher", "rule"]
    args += ["--base-url", "http://h:1/v1", "--model", "m", "--concurrency", "3", "--rpm", "7", "--tpm", "9000"]
    result = runner.invoke(app, [*args, "--limit", "5"])
    assert result.exit_code == 0, result.output
    cfg = seen["settings"].teacher
    assert (cfg.split, cfg.kind, cfg.base_url, cfg.model) == ("val", "rule", "http://h:1/v1", "m")
    assert (cfg.concurrency, cfg.rpm, cfg.tpm, cfg.limit) == (3, 7, 9000, 5)
    assert (seen["data"], seen["out"]) == ("in", "o")


def test_cli_openai_without_a_key_is_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("MATHWIZARD_TEACHER_API_KEY", raising=False)
    result = runner.invoke(app, ["teach", "--home", str(tmp_path), "--teacher", "openai"])
    assert result.exit_code == 1
    assert "MATHWIZARD_TEACHER_API_KEY" in result.output and "Traceback" not in result.output


def test_cli_rejects_an_unknown_teacher(tmp_path: Path) -> None:
    result = runner.invoke(app, ["teach", "--home", str(tmp_path), "--teacher", "gpt"])
    assert result.exit_code == 1 and "teacher.kind" in result.output
