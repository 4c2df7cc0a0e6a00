"""The Prefect layer (task policy, flow, artifacts, the Secret block token) and the `mathwizard publish` command."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from mathwizard.cli import app
from mathwizard.config import Settings, load_settings
from tests.conftest import TOKEN
from tests.publish.fakehub import FakeHub
from tests.publish.synthetic import make_run

runner = CliRunner()
MODEL = "acme/math-wizard-gemma-3n-dpo"


def _latest_artifact(key: str) -> Any:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    return max(found, key=lambda artifact: artifact.created)


def test_task_policy() -> None:
    from tasks.common import retry_if_transient
    from tasks.publish import publish

    assert publish.name == "publish" and publish.retries == 3
    assert publish.retry_delay_seconds == [2, 4, 8]  # exponential_backoff(backoff_factor=2) over 3 retries
    assert publish.retry_jitter_factor == 0.5 and publish.retry_condition_fn is retry_if_transient
    assert publish.cache_key_fn is not None and publish.persist_result


def test_flow_publishes_locally_and_lists_the_repos(prefect_harness, run_dir: Path, tmp_path: Path) -> None:
    from flows.publish import publish_flow

    settings = load_settings(home=str(tmp_path / "home"), publish={"namespace": "acme"})
    out = tmp_path / "07-publish"

    manifest = publish_flow(settings=settings, run_dir=str(run_dir), out=str(out))

    assert manifest["extra"]["destination"] == "local" and manifest["counts"]["repos"] == 3
    assert (out / "models" / MODEL / "README.md").is_file()
    artifact = _latest_artifact("publish-summary")
    assert "written to" in artifact.data and "(not uploaded)" in artifact.data
    assert f"| {MODEL} | model | 18 | `models/{MODEL}` | – |" in artifact.data


def test_flow_uploads_with_the_token_from_a_secret_block(
    prefect_harness, run_dir: Path, tmp_path: Path, fake_hub: FakeHub
) -> None:
    from prefect.blocks.system import Secret
    from prefect.settings import get_current_settings

    from flows.publish import publish_flow

    Secret(value=TOKEN).save("hf-token-publish-test", overwrite=True)
    settings = load_settings(
        home=str(tmp_path / "home"),
        publish={"namespace": "acme", "endpoint": fake_hub.url, "token_block": "hf-token-publish-test"},
    )
    out = tmp_path / "07-publish"

    manifest = publish_flow(settings=settings, run_dir=str(run_dir), out=str(out))

    assert manifest["extra"]["destination"] == "hub" and len(fake_hub.commits()) == 3
    assert all(r.headers["authorization"] == f"Bearer {TOKEN}" for r in fake_hub.requests)
    summary = _latest_artifact("publish-summary")
    assert f"uploaded to {fake_hub.url}" in summary.data and TOKEN not in summary.data
    link = _latest_artifact("publish-model")
    assert link.data == f"[{MODEL}]({fake_hub.url}/{MODEL})"
    # Not in the persisted task result, the stage folder, the run folder or the Prefect home.
    results = Path(get_current_settings().results.local_storage_path)
    scanned = [p for root in (results, tmp_path) if root.exists() for p in root.rglob("*") if p.is_file()]
    assert any(p.is_relative_to(results) for p in scanned)  # the result was persisted there
    assert not [p for p in scanned if TOKEN.encode() in p.read_bytes()]


def test_cli_turns_flags_into_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import flows.publish

    received: dict[str, Any] = {}

    def fake_flow(settings: Settings, run_dir: str | None = None, out: str | None = None) -> dict[str, Any]:
        received.update(settings=settings, run_dir=run_dir, out=out)
        repo = {"repo_id": MODEL, "url": f"http://hub/{MODEL}", "commit": "abcdef123456789"}
        return {"fingerprint": "f" * 64, "extra": {"destination": "hub", "root": "/r", "repos": [repo]}}

    monkeypatch.setattr(flows.publish, "publish_flow", fake_flow)
    monkeypatch.setenv("PREFECT_LOCAL_STORAGE_PATH", str(tmp_path / "results"))
    args = ["publish", "--home", str(tmp_path), "--run-name", "r1", "--run-dir", "some/run", "--namespace", "acme"]
    args += ["--public", "--require-improvement", "--endpoint", "http://127.0.0.1:5", "--target", "t"]

    result = runner.invoke(app, args)

    assert result.exit_code == 0, result.output
    cfg = received["settings"].publish
    assert (cfg.namespace, cfg.private, cfg.require_improvement) == ("acme", False, True)
    assert (cfg.endpoint, cfg.target, cfg.push_merged) == ("http://127.0.0.1:5", "t", False)
    assert received["run_dir"] == "some/run" and received["out"] is None
    assert received["settings"].run_name == "r1"
    assert f"published http://hub/{MODEL} (commit abcdef123456)" in result.output


def test_cli_end_to_end_offline(
    prefect_harness, run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PREFECT_LOCAL_STORAGE_PATH", str(tmp_path / "results"))
    home = tmp_path / "home"

    result = runner.invoke(app, ["publish", "--home", str(home), "--run-dir", str(run_dir)])

    assert result.exit_code == 0, result.output
    assert "wrote math-wizard/math-wizard-gemma-3n-dpo" in result.output and "not uploaded" in result.output
    assert (home / "runs" / "default" / "07-publish" / "datasets" / "math-wizard" / "math-wizard-sft").is_dir()


def test_cli_gate_refusal_is_one_line(prefect_harness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREFECT_LOCAL_STORAGE_PATH", str(tmp_path / "results"))
    run_dir = make_run(tmp_path / "run", accuracies={"sft": 0.4, "dpo": 0.35})

    args = ["publish", "--home", str(tmp_path / "home"), "--run-dir", str(run_dir), "--require-improvement"]
    result = runner.invoke(app, args)

    assert result.exit_code == 1
    assert "DPO accuracy 0.350 is below SFT accuracy 0.400" in result.output
    assert result.output.count("error:") == 1 and "Traceback" not in result.output


def test_flow_retries_a_hub_5xx_but_not_a_refusal(
    prefect_harness, run_dir: Path, tmp_path: Path, fake_hub: FakeHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows.publish import publish_flow
    from mathwizard.errors import PublishError

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    settings = load_settings(home=str(tmp_path / "home"), publish={"namespace": "acme", "endpoint": fake_hub.url})
    fake_hub.fail_next(r"/api/datasets/acme/math-wizard-dpo/commit/", 503)

    manifest = publish_flow(settings=settings, run_dir=str(run_dir), out=str(tmp_path / "a"))

    # The task's second attempt re-compares and sends only the refused commit again.
    assert [c.path.split("/")[4] for c in fake_hub.commits()] == [
        "math-wizard-gemma-3n-dpo",
        "math-wizard-sft",
        "math-wizard-dpo",
        "math-wizard-dpo",
    ]
    assert [r["commit"] is not None for r in manifest["extra"]["repos"]] == [False, False, True]

    monkeypatch.setenv("HF_TOKEN", "hf_wrong_token_000000000000000000000")
    sent = len(fake_hub.requests)
    with pytest.raises(PublishError, match=r"\(401\)"):
        publish_flow(settings=settings, run_dir=str(run_dir), out=str(tmp_path / "b"))
    # One attempt, no retry: create_repo refused, then create_repo's own "does it exist anyway?" check.
    assert [(r.method, r.path) for r in fake_hub.requests[sent:]] == [
        ("POST", "/api/repos/create"),
        ("GET", "/api/models/acme/math-wizard-gemma-3n-dpo"),
    ]
