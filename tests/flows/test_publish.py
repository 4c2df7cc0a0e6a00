"""The publish flow: the repos listed in artifacts, nothing sent without push, the Hub token from a Secret block,
retries of a Hub 5xx only."""

from __future__ import annotations

from pathlib import Path

import pytest

from mathwizard.config import load_settings
from mathwizard.stages.publish import Report
from tests.flows.artifacts import latest
from tests.publish.fakehub import TOKEN, FakeHub

pytestmark = pytest.mark.usefixtures("no_hub_login")
MODEL = "acme/math-wizard-gemma-3n-dpo"


def test_flow_publishes_locally_and_lists_the_repos(prefect_harness, run_dir: Path, tmp_path: Path) -> None:
    from flows.publish import publish_flow

    settings = load_settings(home=str(tmp_path / "home"), publish={"namespace": "acme"})
    out = tmp_path / "07-publish"

    manifest = publish_flow(settings=settings, run_dir=str(run_dir), out=str(out))

    report = Report.of(manifest)
    assert report.destination == "local" and len(report.repos) == 3
    assert (out / "models" / MODEL / "README.md").is_file()
    artifact = latest("publish-summary")
    assert "written to" in artifact.data and "(not uploaded: publish.push is false)" in artifact.data
    assert f"| {MODEL} | model | 18 | `models/{MODEL}` | – |" in artifact.data


def test_flow_uploads_with_the_token_from_a_secret_block(
    prefect_harness, run_dir: Path, tmp_path: Path, fake_hub: FakeHub
) -> None:
    from prefect.blocks.system import Secret
    from prefect.settings import get_current_settings

    from flows.publish import publish_flow

    Secret(value=TOKEN).save("hf-token-publish-test", overwrite=True)
    publish = {"namespace": "acme", "endpoint": fake_hub.url, "token_block": "hf-token-publish-test"}
    # The token in the block is not enough: without push nothing is sent.
    quiet = load_settings(home=str(tmp_path / "home"), publish=publish)
    unasked = publish_flow(settings=quiet, run_dir=str(run_dir), out=str(tmp_path / "local"))
    assert Report.of(unasked).destination == "local" and fake_hub.requests == []

    settings = load_settings(home=str(tmp_path / "home"), publish={**publish, "push": True})
    out = tmp_path / "07-publish"

    results = Path(get_current_settings().results.local_storage_path)
    before = {p for p in results.rglob("*") if p.is_file()} if results.exists() else set()
    manifest = publish_flow(settings=settings, run_dir=str(run_dir), out=str(out))

    assert Report.of(manifest).destination == "hub" and len(fake_hub.commits()) == 3
    assert all(r.headers["authorization"] == f"Bearer {TOKEN}" for r in fake_hub.requests)
    summary = latest("publish-summary")
    assert f"uploaded to {fake_hub.url}" in summary.data and TOKEN not in summary.data
    link = latest("publish-model")
    assert link.data == f"[{MODEL}]({fake_hub.url}/{MODEL})"
    # Not in the stage folder, the run folder or a persisted result: this flow persisted none (NO_CACHE), and the
    # token was never a parameter, only read inside the task from the block.
    after = {p for p in results.rglob("*") if p.is_file()} if results.exists() else set()
    assert after == before
    scanned = [p for p in tmp_path.rglob("*") if p.is_file()] + sorted(after)
    assert len(scanned) > 40 and not [p for p in scanned if TOKEN.encode() in p.read_bytes()]


def test_flow_retries_a_hub_5xx_but_not_a_refusal(
    prefect_harness, run_dir: Path, tmp_path: Path, fake_hub: FakeHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    import flows.publish
    from flows.publish import publish_flow
    from mathwizard.errors import PublishError
    from tasks import stages

    # The retry itself, not its 1-3 s wait (the delays are test_stages.py's): as tests/flows/test_teach.py does.
    monkeypatch.setattr(flows.publish, "publish", stages.publish.with_options(retry_delay_seconds=0))
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    settings = load_settings(
        home=str(tmp_path / "home"), publish={"namespace": "acme", "endpoint": fake_hub.url, "push": True}
    )
    fake_hub.fail_next(r"/api/datasets/acme/math-wizard-dpo/commit/", 503)

    manifest = publish_flow(settings=settings, run_dir=str(run_dir), out=str(tmp_path / "a"))

    # The task's second attempt re-compares and sends only the refused commit again.
    assert [c.path.split("/")[4] for c in fake_hub.commits()] == [
        "math-wizard-gemma-3n-dpo",
        "math-wizard-sft",
        "math-wizard-dpo",
        "math-wizard-dpo",
    ]
    assert [r.commit is not None for r in Report.of(manifest).repos] == [False, False, True]

    monkeypatch.setenv("HF_TOKEN", "hf_wrong_token_000000000000000000000")
    sent = len(fake_hub.requests)
    with pytest.raises(PublishError, match=r"\(401\)"):
        publish_flow(settings=settings, run_dir=str(run_dir), out=str(tmp_path / "b"))
    # One attempt, no retry: create_repo refused, then create_repo's own "does it exist anyway?" check.
    assert [(r.method, r.path) for r in fake_hub.requests[sent:]] == [
        ("POST", "/api/repos/create"),
        ("GET", "/api/models/acme/math-wizard-gemma-3n-dpo"),
    ]
