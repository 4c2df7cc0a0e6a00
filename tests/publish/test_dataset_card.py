"""The SFT and DPO dataset repos: card metadata and body, and the folder loads offline with `datasets` and goes
through TRL's vision collators as it is."""

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
                {"split": "validation", "path": "data/validation-*"},
                {"split": "test", "path": "data/test-*"},
            ],
        }
    ]
    features = {f["name"]: f.get("dtype") for f in sft.data.dataset_info["features"]}
    assert features["image"] == "image" and features["solution"] == "string"
    assert {"messages", "images"} <= set(features)
    info = sft.data.dataset_info
    splits = {s["name"]: s["num_examples"] for s in info["splits"]}
    assert splits == {"train": 6, "validation": 2, "test": 2}
    # Real sizes: the Arrow bytes of each split, and the parquet files' bytes as the download size.
    assert all(s["num_bytes"] > 0 for s in info["splits"])
    assert info["dataset_size"] == sum(s["num_bytes"] for s in info["splits"])
    files = sorted((published / "datasets" / SFT / "data").glob("*.parquet"))
    assert info["download_size"] == sum(f.stat().st_size for f in files) and len(files) == 3
    dpo = DatasetCard.load(published / "datasets" / DPO / "README.md")
    assert {s["name"]: s["num_examples"] for s in dpo.data.dataset_info["splits"]} == {"train": 4, "validation": 2}
    dpo_features = {f["name"] for f in dpo.data.dataset_info["features"]}
    assert {"image", "question", "prompt", "chosen", "rejected", "images", "strategy"} <= dpo_features


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
    assert "| rejected | list of messages | Dispreferred answer" in dpo and "excluded: 1 (no flawed answer" in dpo
    assert "| images | list of images |" in dpo and "DataCollatorForVisionPreference" in dpo
    assert "| messages | list of messages |" in sft and "| validation | 2 |" in sft


@pytest.mark.parametrize(
    ("repo", "rows"), [(SFT, {"train": 6, "validation": 2, "test": 2}), (DPO, {"train": 4, "validation": 2})]
)
def test_load_dataset_reads_the_written_folder_offline(
    published: Path, tmp_path: Path, repo: str, rows: dict[str, int]
) -> None:
    import datasets

    loaded = datasets.load_dataset(str(published / "datasets" / repo), cache_dir=str(tmp_path / "cache"))
    assert {split: ds.num_rows for split, ds in loaded.items()} == rows
    assert isinstance(loaded["train"].features["image"], datasets.Image)
    assert loaded["train"][0]["image"].size == (8, 6)  # decoded to PIL


def _load(published: Path, repo: str, tmp_path: Path):
    import datasets

    return datasets.load_dataset(str(published / "datasets" / repo), cache_dir=str(tmp_path / "cache"))


def test_the_datasets_keep_the_stage_columns_and_add_trls(published: Path, run_dir: Path, tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    from mathwizard.prompts import load_prompt

    sft = _load(published, SFT, tmp_path)["train"]
    teach = pq.read_table(run_dir / "02-teach" / "train.parquet")
    assert sft.column_names[: teach.num_columns] == teach.column_names  # every seed column, in its place
    row, source = sft[0], teach.slice(0, 1).to_pylist()[0]
    assert row["solution"] == source["solution"] and row["question"] == source["question"]
    system, user, answer = row["messages"]
    assert (system["role"], system["content"][0]["text"]) == ("system", load_prompt("tutor_system"))
    assert [c["type"] for c in user["content"]] == ["image", "text"] and user["content"][1]["text"] == row["question"]
    assert answer == {"role": "assistant", "content": [{"type": "text", "text": source["solution"]}]}
    assert len(row["images"]) == 1 and row["images"][0].tobytes() == row["image"].tobytes()

    dpo = _load(published, DPO, tmp_path)["validation"]
    pairs = pq.read_table(run_dir / "04-pairs" / "val.parquet").slice(0, 1).to_pylist()[0]
    row = dpo[0]
    assert row["prompt"][1]["content"][1]["text"] == pairs["question"] == row["question"]
    assert row["chosen"] == [{"role": "assistant", "content": [{"type": "text", "text": pairs["chosen"]}]}]
    assert row["rejected"][0]["content"][0]["text"] == pairs["rejected"]
    assert row["strategy"] == pairs["strategy"] and len(row["images"]) == 1


def test_a_published_batch_goes_through_trls_vision_collators(published: Path, tmp_path: Path) -> None:
    """What a TRL user does with the folders (or the Hub repos): load them and batch them, nothing converted."""
    from transformers import AutoProcessor
    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    from mathwizard.models.tiny import ensure_tiny

    processor = AutoProcessor.from_pretrained(ensure_tiny())
    # Whole rows (the collators then take the figure from `image`), and TRL's columns alone (from `images`).
    sft = _load(published, SFT, tmp_path)["train"].select(range(2))
    for rows in ([dict(row) for row in sft], [dict(row) for row in sft.select_columns(["messages", "images"])]):
        batch = DataCollatorForVisionLanguageModeling(processor)(rows)
        assert batch["input_ids"].shape[0] == 2 and batch["pixel_values"].shape[0] == 2
        assert (batch["labels"] != -100).any()

    dpo = _load(published, DPO, tmp_path)["train"].select(range(2))
    trl_only = dpo.select_columns(["prompt", "chosen", "rejected", "images"])
    for rows in ([dict(row) for row in dpo], [dict(row) for row in trl_only]):
        batch = DataCollatorForVisionPreference(processor)(rows)
        assert batch["input_ids"].shape[0] == 4  # chosen and rejected of each pair
        assert batch["pixel_values"].shape[0] == 4 and batch["completion_mask"].sum() > 0
