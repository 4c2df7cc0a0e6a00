"""The DPO flow on the tiny model: the stage in a Prefect run on an SFT folder, with step progress, metrics, plots."""

from __future__ import annotations

from pathlib import Path

from mathwizard.config import ModelConfig, SFTConfig, load_settings
from mathwizard.stages import dpo, sft
from tests.flows.artifacts import of_run, table
from tests.training.builders import pairs_folder, teach_folder

SMALL = {"max_steps": 2, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1, "max_length": 512}


def test_flow_aligns_the_sft_model_and_shows_progress_and_rewards(prefect_harness: None, tmp_path: Path) -> None:
    from flows.dpo import dpo_flow

    settings = load_settings(home=str(tmp_path / "home"), dpo={**SMALL, "warmup_steps": 0})
    # The run's own folders: the flow's defaults are 03-sft and 04-pairs.
    teach = teach_folder(tmp_path / "02-teach", n_train=2, n_val=0)
    sft.run(SFTConfig(**{**SMALL, "max_steps": 1}), ModelConfig(), teach, Path(settings.stage_dir("sft")))
    pairs_folder(Path(settings.stage_dir("pairs")), n_train=4, n_val=0)

    state = dpo_flow(settings=settings, return_state=True)
    manifest = state.result()
    report = dpo.Report.of(manifest)
    assert manifest["stage"] == "dpo" and (report.steps, report.train_rows) == (2, 4)
    assert report.sft_adapter == str((Path(settings.stage_dir("sft")) / "adapter").resolve())
    assert (Path(settings.stage_dir("dpo")) / "adapter" / "adapter_config.json").is_file()

    found, tasks = of_run(state)
    assert tasks == ["Completed"]
    assert float(found["dpo-progress"].data) == 100.0
    # the live description carries the latest training metrics beside the step count
    description = found["dpo-progress"].description
    assert description.startswith("dpo: optimizer steps: 2 of 2 · loss ") and "reward_accuracies" in description
    rows = {r["metric"]: r["value"] for r in table("dpo-metrics")}
    assert rows["steps"] == 2 and rows["rewards_accuracies"] == report.rewards_accuracies
    plots = {"dpo-loss", "dpo-rewards-accuracies", "dpo-rewards-chosen", "dpo-rewards-rejected", "dpo-rewards-margins"}
    assert plots <= set(found)
