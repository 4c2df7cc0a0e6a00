"""The SFT flow on the tiny model: the stage in a Prefect run with live step progress, its metrics table and plot."""

from __future__ import annotations

from pathlib import Path

from mathwizard.config import load_settings
from mathwizard.stages import sft
from tests.flows.artifacts import of_run, table
from tests.training.builders import teach_folder

SMALL = {
    "max_steps": 2,
    "per_device_train_batch_size": 2,
    "gradient_accumulation_steps": 1,
    "max_length": 512,
    "warmup_steps": 0,
}


def test_flow_trains_and_shows_progress_metrics_and_loss(prefect_harness: None, tmp_path: Path) -> None:
    from flows.sft import sft_flow

    teach = teach_folder(tmp_path / "02-teach", n_train=4, n_val=2)
    settings = load_settings(home=str(tmp_path / "home"), sft=SMALL)
    state = sft_flow(settings=settings, data=str(teach), return_state=True)
    manifest = state.result()
    out = Path(settings.stage_dir("sft"))  # the default out folder
    assert manifest["stage"] == "sft" and (out / "adapter" / "adapter_config.json").is_file()
    report = sft.Report.of(manifest)
    assert (report.steps, report.train_rows, report.val_rows) == (2, 4, 2)

    found, tasks = of_run(state)
    assert tasks == ["Completed"]
    assert float(found["sft-progress"].data) == 100.0
    assert found["sft-progress"].description.startswith("sft: optimizer steps: 2 of 2 · loss ")
    rows = {r["metric"]: r["value"] for r in table("sft-metrics")}
    assert (rows["steps"], rows["train_rows"], rows["base_model"]) == (2, 4, "tiny")
    assert rows["seconds"] == manifest["seconds"]
    assert "data:image/png;base64," in found["sft-loss"].data

    again = sft_flow(settings=settings, data=str(teach), return_state=True)
    assert again.result() == manifest
    found, _ = of_run(again)
    assert "sft-progress" not in found  # skipped by its manifest: no progress bar
