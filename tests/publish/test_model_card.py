"""The model repo and its card: YAML metadata, eval table and reports, lineage, training settings, plots, licence,
usage, a portable base."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from mathwizard.config import PublishConfig
from mathwizard.models import adapter_base
from mathwizard.stages import publish
from tests.publish.synthetic import BASE_MODEL, LOCAL_BASE_DIR, MM_MATH_COMMIT, make_run

MODEL, SFT, DPO = "acme/math-wizard-gemma-3n-dpo", "acme/math-wizard-sft", "acme/math-wizard-dpo"


def _publish(run_dir: Path, out: Path, **cfg) -> Path:
    publish.run(PublishConfig(namespace="acme", **cfg), run_dir, out)
    return out


@pytest.fixture
def published(run_dir: Path, tmp_path: Path) -> Path:
    return _publish(run_dir, tmp_path / "07-publish")


def test_model_card_metadata(published: Path) -> None:
    card = ModelCard.load(published / "models" / MODEL / "README.md")
    assert card.data.license == "gemma"
    assert card.data.base_model == BASE_MODEL
    assert card.data.library_name == "peft" and card.data.pipeline_tag == "image-text-to-text"
    assert card.data.datasets == [SFT, DPO, "THU-KEG/MM_Math"]
    assert {"sft", "dpo", "gemma3n"} <= set(card.data.tags)


def test_model_card_carries_the_dpo_models_results_as_model_index(published: Path) -> None:
    """The Hub's evaluation widget reads `model-index`: the published (DPO) model's test results, on the test split
    published with the SFT dataset."""
    card = ModelCard.load(published / "models" / MODEL / "README.md")
    assert card.data.model_name == MODEL.split("/")[1]
    results = {r.metric_type: r for r in card.data.eval_results}
    assert set(results) == {"accuracy", "format_rate"}
    accuracy = results["accuracy"]
    assert (accuracy.metric_value, results["format_rate"].metric_value) == (0.5, 1.0)  # synthetic DPO report
    assert (accuracy.task_type, accuracy.dataset_type, accuracy.dataset_split) == ("image-text-to-text", SFT, "test")
    [index] = card.data.to_dict()["model-index"]
    [result] = index["results"]  # one task on one dataset, two metrics
    assert index["name"] == MODEL.split("/")[1] and len(result["metrics"]) == 2


def test_model_card_eval_table_has_every_stage_and_difficulty(published: Path) -> None:
    text = (published / "models" / MODEL / "README.md").read_text()
    assert "| model | problems | accuracy | format followed | easy | medium | hard |" in text
    assert "| base | 10 | 10.0% | 20.0% | 50.0% (n=2) | 0.0% (n=6) | 0.0% (n=2) |" in text
    assert "| SFT | 10 | 40.0% | 90.0% | 100.0% (n=2) | 33.3% (n=6) | 0.0% (n=2) |" in text
    assert "| DPO | 10 | 50.0% | 100.0% | 100.0% (n=2) | 50.0% (n=6) | 0.0% (n=2) |" in text
    reports = {p.stem: json.loads(p.read_text()) for p in (published / "models" / MODEL / "eval").glob("*.json")}
    assert sorted(reports) == ["base", "dpo", "sft"]
    assert reports["dpo"] == {
        "label": "dpo",
        "split": "test",
        "n": 10,
        "accuracy": 0.5,
        "format_rate": 1.0,
        "by_difficulty": {
            "easy": {"n": 2, "accuracy": 1.0},
            "medium": {"n": 6, "accuracy": 0.5},
            "hard": {"n": 2, "accuracy": 0.0},
        },
        "generated_tokens": 1200,
        "max_new_tokens": 1024,
        "items": 10,
        "no_reference": 0,
    }  # fmt: skip  (no model_location: a local path; no seconds: this machine's)


def test_model_card_lineage_and_training_settings(published: Path) -> None:
    text = (published / "models" / MODEL / "README.md").read_text()
    assert f"revision: {MM_MATH_COMMIT}" in text and "arXiv:2404.05091" in text
    assert "- Teacher: `gpt-4o-mini`, prompt version `v1`; 3 item(s) excluded" in text
    assert f"- SFT data ([{SFT}](https://huggingface.co/datasets/{SFT})): train 6, val 2, test 2 rows." in text
    # strategies over train + val: calculation_error 2 + 1, misapplied_concept 1, broken_process 1 + 1
    assert "train 4, val 2 rows; rejected answers sampled from the SFT model" in text
    assert "(broken_process 2, calculation_error 3, misapplied_concept 1); 1 item(s) excluded." in text
    assert f"- Base model: `{BASE_MODEL}`; backend: hf." in text
    assert "trained on top of `03-sft/adapter` (published in `sft-adapter/`; merge it first)" in text
    for row in (
        "| learning rate | 0.0002 | 5e-06 |",
        "| optimizer steps | 320 | 100 |",
        "| gradient accumulation | 8 | 4 |",
        "| DPO beta | – | 0.1 |",
        "| LoRA r | 16 | 4 |",
        "| LoRA dropout | 0.05 | 0.1 |",
    ):
        assert row in text


def test_model_card_plots_are_copied_and_referenced(published: Path, run_dir: Path) -> None:
    repo = published / "models" / MODEL
    referenced = re.findall(r"!\[[^\]]+\]\((plots/[^)]+\.png)\)", (repo / "README.md").read_text())
    assert len(referenced) == 6  # SFT loss + 5 DPO curves
    assert sorted(referenced) == sorted(f"plots/{p.name}" for p in (repo / "plots").iterdir())
    assert (repo / "plots" / "dpo_rewards_margins.png").read_bytes() == (
        run_dir / "05-dpo" / "rewards_margins.png"
    ).read_bytes()
    assert "![DPO rewards accuracies](plots/dpo_rewards_accuracies.png)" in (repo / "README.md").read_text()


def test_model_card_usage_and_licence(published: Path) -> None:
    text = (published / "models" / MODEL / "README.md").read_text()
    assert f'mathwizard ask --model {MODEL} --image figure.png "Find the length of AB."' in text
    assert f'BASE = "{BASE_MODEL}"' in text
    assert f'PeftModel.from_pretrained(model, "{MODEL}", subfolder="sft-adapter").merge_and_unload()' in text
    assert f'model = PeftModel.from_pretrained(model, "{MODEL}")' in text
    assert "[Gemma Terms of Use](https://ai.google.dev/gemma/terms)" in text
    assert "MM_Math (MIT); the published datasets are MIT." in text


def test_model_repo_names_its_base_portably(published: Path, tmp_path: Path) -> None:
    repo = published / "models" / MODEL
    pointer = json.loads((repo / "mathwizard_adapter.json").read_text())
    assert pointer == {"backend": "hf", "base_model": "sft-adapter", "base_model_relative": "sft-adapter"}
    sft_pointer = json.loads((repo / "sft-adapter" / "mathwizard_adapter.json").read_text())
    assert sft_pointer == {"backend": "hf", "base_model": BASE_MODEL}
    assert json.loads((repo / "adapter_config.json").read_text())["base_model_name_or_path"] == BASE_MODEL
    sft_config = json.loads((repo / "sft-adapter" / "adapter_config.json").read_text())
    assert sft_config["base_model_name_or_path"] == BASE_MODEL
    # The project's loader follows the chain in a downloaded copy: DPO adapter -> SFT adapter -> Hub base.
    assert adapter_base(repo) == str((repo / "sft-adapter").resolve())
    assert adapter_base(repo / "sft-adapter") == BASE_MODEL
    # No local path of this machine in any published file.
    for path in repo.rglob("*"):
        if path.is_file() and path.suffix in {".json", ".md"}:
            text = path.read_text()
            assert str(tmp_path) not in text and LOCAL_BASE_DIR not in text, path


def test_model_card_for_the_offline_tiny_model_and_no_eval(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path / "run", base_model="tiny", evals=())
    out = _publish(run_dir, tmp_path / "out")
    card = ModelCard.load(out / "models" / MODEL / "README.md")
    assert card.data.base_model is None  # not a Hub id: no metadata link
    assert card.data.eval_results is None  # nothing evaluated: no model-index
    assert "a tiny randomly initialised gemma-3n built offline" in card.text
    assert "Not evaluated in this run" in card.text
    assert 'BASE = "path/to/base-model"  # trained on: tiny' in card.text
    assert not (out / "models" / MODEL / "eval").exists()


def test_stale_eval_report_is_flagged(run_dir: Path, tmp_path: Path) -> None:
    manifest = run_dir / "05-dpo" / "manifest.json"
    data = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**data, "fingerprint": "retrained"}))
    text = (_publish(run_dir, tmp_path / "out") / "models" / MODEL / "README.md").read_text()
    assert "the DPO report(s) evaluated an earlier version of that model" in text
    assert "model-index" not in text  # an earlier model's results are not claimed for this one


def test_cards_name_the_rule_teacher_and_the_rule_fallback(run_dir: Path, tmp_path: Path) -> None:
    def edit(manifest: Path, **changes) -> None:
        data = json.loads(manifest.read_text())
        for key, value in changes.items():
            data[key] = {**data[key], **value}
        manifest.write_text(json.dumps(data))

    edit(run_dir / "02-teach" / "manifest.json", config={"kind": "rule"})
    edit(run_dir / "04-pairs" / "manifest.json", report={"written": 6, "from_model": 1, "from_rule": 5})
    out = _publish(run_dir, tmp_path / "out")

    sft = (out / "datasets" / SFT / "README.md").read_text()
    assert "the offline rule-based teacher (`gpt-4o-mini`, prompt version `v1`) reformatted each source" in sft
    dpo = (out / "datasets" / DPO / "README.md").read_text()
    assert "5 of the rejected answers were written by the rule fallback" in dpo and "1 come from the model" in dpo
    model = (out / "models" / MODEL / "README.md").read_text()
    assert "rejected answers from the SFT model (1) and from the rule fallback (5," in model
