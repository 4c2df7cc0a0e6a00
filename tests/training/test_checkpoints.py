"""Checkpoints: only complete ones made with the same settings are resumed (`training/checkpoints.py`)."""

from __future__ import annotations

from pathlib import Path


def test_checkpoints_resume_only_complete_and_matching(tmp_path: Path) -> None:
    from mathwizard.training.checkpoints import last_checkpoint, prepare_checkpoints

    folder = tmp_path / "checkpoints"
    prepare_checkpoints(folder, "fp-a")
    for step in (2, 4, 10):
        (folder / f"checkpoint-{step}").mkdir()
    for step in (2, 4):  # checkpoint-10 was killed mid-save: no trainer_state.json
        (folder / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    assert last_checkpoint(folder) == folder / "checkpoint-4"
    assert not (folder / "checkpoint-10").exists()

    prepare_checkpoints(folder, "fp-a")  # same settings: kept
    assert last_checkpoint(folder) == folder / "checkpoint-4"
    prepare_checkpoints(folder, "fp-b")  # other settings: discarded, never resumed into the wrong schedule
    assert last_checkpoint(folder) is None
    assert (folder / "fingerprint.txt").read_text().strip() == "fp-b"
