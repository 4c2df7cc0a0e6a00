"""Rows as TRL's vision records: the tutor prompt, the figure and the answers (`training/data.py`)."""

from __future__ import annotations

from pathlib import Path

from tests.training.builders import pairs_folder, teach_folder


def test_sft_records_are_trl_vision_prompt_completion(tmp_path: Path) -> None:
    from mathwizard.data.splits import read_dataset
    from mathwizard.prompts import load_prompt
    from mathwizard.training.data import SFT_COLUMNS, sft_records

    folder = teach_folder(tmp_path / "teach", n_train=3, n_val=1)
    rows = read_dataset(folder, "train", SFT_COLUMNS)
    records = sft_records(rows)
    assert len(records) == 3 and set(records.column_names) == {"images", "prompt", "completion"}
    first = records[0]
    assert first["images"][0].mode == "RGB" and first["images"][0].size == (40, 30)
    system, user = first["prompt"]
    assert system["role"] == "system" and system["content"][0]["text"] == load_prompt("tutor_system")
    assert user["role"] == "user" and [part["type"] for part in user["content"]] == ["image", "text"]
    assert user["content"][1]["text"] == rows[0]["question"]
    assert first["completion"] == [{"role": "assistant", "content": [{"type": "text", "text": rows[0]["solution"]}]}]
    assert "### Final Answer" in load_prompt("tutor_system")


def test_dpo_records_carry_the_image_and_both_answers(tmp_path: Path) -> None:
    from mathwizard.data.splits import read_dataset
    from mathwizard.training.data import DPO_COLUMNS, dpo_records

    rows = read_dataset(pairs_folder(tmp_path / "pairs", n_train=2, n_val=1), "train", DPO_COLUMNS)
    records = dpo_records(rows)
    assert set(records.column_names) == {"images", "prompt", "chosen", "rejected"}
    assert records[1]["chosen"][0]["content"][0]["text"] == rows[1]["chosen"]
    assert records[1]["rejected"][0]["content"][0]["text"] == rows[1]["rejected"]
    assert len(records[1]["images"]) == 1
