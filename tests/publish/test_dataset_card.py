"""The SFT and DPO dataset repos: card metadata and body, and the folder loads offline with `datasets`."""

from __future__ import annotations

from pathlib import Path

import pytest
from huggingface_hub import DatasetCard

from mathwizard.config import PublishConfig
from mathwizard.stages import publish
from tests.publish.synthetic import MM_MATH_COMMIT

SFT, DPO = "acme/math-wizard-sft", "acme/math-wizard-dpo"


@pytest.fixture
def published(run_dir: Path, tmp_path: Path) -> Path:
    out = tmp_path / "07-publish"
    publish.run(PublishConfig(namespace="acme"), run_dir, out)
    return out


def test_dataset_cards_metadata(published: Path) -> None:
    sft = DatasetCard.load(published / "datasets" / SFT / "README.md")
    assert sft.data.license == "mit" and sft.data.size_categories == ["n<1K"]
    assert sft.data.configs == [
        {
            "config_name": "default",
            "data_files": [
                {"split": "train", "path": "data/train-*"},
                {"split": "val", "path": "data/val-*"},
                {"split": "test", "path": "data/test-*"},
            ],
        }
    ]
    features = {f["name"]: f["dtype"] for f in sft.data.dataset_info["features"]}
    assert features["image"] == "image" and features["solution"] == "string"
    splits = {s["name"]: s["num_examples"] for s in sft.data.dataset_info["splits"]}
    assert splits == {"train": 6, "val": 2, "test": 2}
    dpo = DatasetCard.load(published / "datasets" / DPO / "README.md")
    assert {s["name"]: s["num_examples"] for s in dpo.data.dataset_info["splits"]} == {"train": 4, "val": 2}
    assert {f["name"]: f["dtype"] for f in dpo.data.dataset_info["features"]}["image"] == "image"


def test_dataset_card_body(published: Path) -> None:
    sft = (published / "datasets" / SFT / "README.md").read_text()
    assert "[THU-KEG/MM_Math](https://huggingface.co/datasets/THU-KEG/MM_Math), licence MIT" in sft
    assert f"Fetched as: hub; revision: {MM_MATH_COMMIT}." in sft
    assert "resized to at most 512 px" in sft and "Rows: train 6, val 2, test 2; quarantined 1." in sft
    assert "teacher model `gpt-4o-mini` (prompt version `v1`, temperature 0.0)" in sft
    assert "excluded: 3 (final answer disagrees with the source ×2; timeout ×1)." in sft
    assert "| image | image | The problem's figure" in sft and "| source_solution | string |" in sft
    assert f'ds = load_dataset("{SFT}")' in sft and "## Licence\n\nMIT" in sft
    dpo = (published / "datasets" / DPO / "README.md").read_text()
    assert "(temperature 1.0, top_p 0.95, max_new_tokens 1024)" in dpo
    assert "(broken_process: 2, calculation_error: 3, misapplied_concept: 1)" in dpo
    assert "| rejected | string | Dispreferred answer" in dpo and "excluded: 1 (no flawed answer" in dpo


@pytest.mark.parametrize(("repo", "rows"), [(SFT, {"train": 6, "val": 2, "test": 2}), (DPO, {"train": 4, "val": 2})])
def test_load_dataset_reads_the_written_folder_offline(
    published: Path, tmp_path: Path, repo: str, rows: dict[str, int]
) -> None:
    import datasets

    loaded = datasets.load_dataset(str(published / "datasets" / repo), cache_dir=str(tmp_path / "cache"))
    assert {split: ds.num_rows for split, ds in loaded.items()} == rows
    assert isinstance(loaded["train"].features["image"], datasets.Image)
    assert loaded["train"][0]["image"].size == (8, 6)  # decoded to PIL
