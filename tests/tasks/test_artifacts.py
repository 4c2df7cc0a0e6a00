"""The UI helpers: a progress artifact fed by `progress(done, total)` and created only when a stage reports, a
training stage's report as a table, and inline PNG plots."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path

import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

from mathwizard.manifest import stage_output
from mathwizard.stages.sft import Report
from tasks import artifacts
from tests.flows.artifacts import of_run


def read(key: str):
    with get_client(sync_client=True) as client:
        return client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, float, str]]:
    """What ProgressArtifact sends to the API: ("create" | "update", percent, description), in order."""
    calls: list[tuple[str, float, str]] = []
    create, update = artifacts.create_progress_artifact, artifacts.update_progress_artifact

    def spy_create(progress, key=None, description=None, **kwargs):
        calls.append(("create", progress, description))
        return create(progress=progress, key=key, description=description, **kwargs)

    def spy_update(artifact_id, progress, description=None, **kwargs):
        calls.append(("update", progress, description))
        return update(artifact_id, progress=progress, description=description, **kwargs)

    monkeypatch.setattr(artifacts, "create_progress_artifact", spy_create)
    monkeypatch.setattr(artifacts, "update_progress_artifact", spy_update)
    return calls


def test_progress_is_created_at_the_first_report_throttled_and_ends_at_the_total(prefect_harness, sent: list) -> None:
    @flow
    def loop() -> None:
        progress = artifacts.ProgressArtifact(key="test-progress", description="items", every_s=3600)
        assert progress.id is None and sent == []  # nothing exists before the stage reports
        progress(1, 7)
        assert sent == [("create", 100 / 7, "items: 1 of 7")] and progress.id is not None
        for done in range(2, 7):
            progress(done, 7)  # throttled: nothing sent between the first report and the last
        assert len(sent) == 1

        async def from_a_loop() -> None:  # the teacher calls back from inside its event loop
            progress(7, 7)

        asyncio.run(from_a_loop())

    loop()
    assert sent[1:] == [("update", 100.0, "items: 7 of 7")]  # reaching the total always sends
    [artifact] = read("test-progress")
    assert artifact.type == "progress" and float(artifact.data) == 100.0
    assert artifact.description == "items: 7 of 7"


def test_a_stage_that_never_reports_creates_no_artifact(prefect_harness, sent: list) -> None:
    @flow
    def skipped() -> None:
        artifacts.ProgressArtifact(key="test-skipped-progress", description="items")  # handed to a skipped stage

    skipped()
    assert sent == [] and read("test-skipped-progress") == []


def test_an_empty_stage_shows_complete(prefect_harness, sent: list) -> None:
    @flow
    def empty() -> None:
        artifacts.ProgressArtifact(key="test-empty-progress", description="items")(0, 0)

    empty()
    assert sent == [("create", 100.0, "items: 0 of 0")]


def test_image_artifact_embeds_the_png(prefect_harness, tmp_path: Path) -> None:
    png = tmp_path / "loss.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\nfake")

    @flow
    def plots() -> None:
        artifacts.create_image_artifact(png, key="test-loss", title="sft: loss")

    plots()
    [artifact] = read("test-loss")
    assert artifact.type == "markdown"
    assert f"data:image/png;base64,{base64.b64encode(png.read_bytes()).decode()}" in artifact.data


def _sft_manifest(out: Path):
    report = Report(
        train_rows=8,
        val_rows=2,
        steps=3,
        resumed_from_step=None,
        base_model="tiny",
        backend="hf",
        device="cpu",
        dtype="float32",
        trainable_parameters=10,
        total_parameters=100,
        train_loss=1.23456789,
        final_loss=None,
        eval_loss=2.5,
    )
    with stage_output(out, stage="sft", version=1, fingerprint="f" * 64) as record:
        (out / "loss.png").write_bytes(b"\x89PNG\r\n\x1a\nloss")
        record.report(report)
    return record.manifest


def test_report_rows_are_the_scalars_of_the_report_and_the_seconds(tmp_path: Path) -> None:
    manifest = _sft_manifest(tmp_path / "03-sft")
    rows = artifacts.report_rows(manifest)
    assert rows[:3] == [
        {"metric": "train_rows", "value": 8},
        {"metric": "val_rows", "value": 2},
        {"metric": "steps", "value": 3},
    ]
    assert {"metric": "train_loss", "value": 1.234568} in rows  # rounded to 6 places
    assert {"metric": "base_model", "value": "tiny"} in rows
    assert not [r for r in rows if r["metric"] in ("resumed_from_step", "final_loss")]  # None: left out
    assert {"metric": "processes", "value": 1} in rows  # data-parallel processes (GPUs) the run trained on
    assert rows[-1] == {"metric": "seconds", "value": manifest.seconds} and len(rows) == 12 + 1


def test_training_artifacts_are_the_table_and_the_plots_that_exist(prefect_harness, tmp_path: Path) -> None:
    out = tmp_path / "03-sft"
    manifest = _sft_manifest(out)

    @flow
    def show() -> None:
        artifacts.training_artifacts("sft", manifest, out, (("loss", "loss.png"), ("eval loss", "eval_loss.png")))

    shown = show(return_state=True)
    found, _ = of_run(shown)
    assert set(found) == {"sft-metrics", "sft-loss"}  # no eval_loss.png: no artifact for it
    table = found["sft-metrics"]
    data = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert data == artifacts.report_rows(manifest) and table.description == f"sft run in {out}"
    assert "### sft: loss" in found["sft-loss"].data
