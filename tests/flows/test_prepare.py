"""The prepare flow: the stage in a Prefect run with its counts table; a re-run is skipped by the stage's manifest."""

from __future__ import annotations

from pathlib import Path

import pytest

from mathwizard.config import load_settings
from mathwizard.stages import prepare
from tests.flows.artifacts import of_run, table


def test_flow_runs_once_then_the_manifest_skips_it(
    prefect_harness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows.prepare import prepare_flow

    written: list[str] = []  # the (sub-)stages that wrote their folder
    real = prepare.stage_output
    monkeypatch.setattr(prepare, "stage_output", lambda folder, **k: written.append(k["stage"]) or real(folder, **k))
    settings = load_settings(home=str(tmp_path / "home"), prepare={"limit": 12, "workers": 1})

    first = prepare_flow(settings=settings)
    assert written == ["prepare", "prepare.fetch", "prepare.clean"]
    assert first["stage"] == "prepare" and prepare.Report.of(first).kept == 12
    assert (Path(settings.stage_dir("prepare")) / "manifest.json").is_file()  # the default out folder
    rows = table("prepare-counts")
    assert rows[:2] == [{"what": "rows read", "count": 12}, {"what": "kept", "count": 12}]
    assert [r["what"] for r in rows[2:5]] == ["split train", "split val", "split test"]
    assert sum(r["count"] for r in rows[2:5]) == 12 and rows[5] == {"what": "quarantined", "count": 0}

    state = prepare_flow(settings=settings, return_state=True)
    assert written == ["prepare", "prepare.fetch", "prepare.clean"]  # nothing ran: the stage found its manifest
    assert state.result() == first
    _, tasks = of_run(state)
    assert tasks == ["Completed"]  # a plain completed task: no Prefect cache takes the decision

    # A deleted output file makes the stage run again; its fetch and clean steps are still intact.
    (Path(settings.stage_dir("prepare")) / "train-00000-of-00001.parquet").unlink()
    third = prepare_flow(settings=settings)
    assert written == ["prepare", "prepare.fetch", "prepare.clean", "prepare"]
    assert third["fingerprint"] == first["fingerprint"] and third["files"] == first["files"]
