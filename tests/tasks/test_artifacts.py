"""The UI helpers: a live progress artifact fed by the library's progress(n) callback, and inline PNG plots."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path

from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

from tasks import artifacts


def read(key: str):
    with get_client(sync_client=True) as client:
        return client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))


def test_progress_is_throttled_and_ends_at_the_total(prefect_harness, monkeypatch) -> None:
    sent: list[float] = []
    real = artifacts.update_progress_artifact

    def spy(artifact_id, progress, description=None, **kwargs):
        sent.append(progress)
        return real(artifact_id, progress=progress, description=description, **kwargs)

    monkeypatch.setattr(artifacts, "update_progress_artifact", spy)

    @flow
    def loop() -> None:
        progress = artifacts.ProgressArtifact(total=7, key="test-progress", description="items", every_s=3600)
        for _ in range(6):
            progress(1)  # throttled: nothing sent before the last item
        assert sent == []

        async def from_a_loop() -> None:  # the teacher calls back from inside its event loop
            progress(1)

        asyncio.run(from_a_loop())
        progress.finish()

    loop()
    assert sent == [100.0, 100.0]  # reaching the total sends once; finish() sends the final state again
    [artifact] = read("test-progress")
    assert artifact.type == "progress" and float(artifact.data) == 100.0
    assert artifact.description == "items: 7 of 7"


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
