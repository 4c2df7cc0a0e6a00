"""`mathwizard prepare`: flags reach the settings, user errors are one line with exit 1, and a real run works."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from mathwizard.cli import app

runner = CliRunner()
FIXTURES = Path(__file__).parent / "data"


@pytest.fixture(autouse=True)
def _restore_prefect_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI sets Prefect defaults with os.environ.setdefault; undo them after each test."""
    for name in ("PREFECT_LOCAL_STORAGE_PATH", "PREFECT_LOGGING_EXTRA_LOGGERS"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def fake_flow(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Replace the flow; record what the command passed to it."""
    import flows.prepare

    received: list[dict[str, Any]] = []

    def prepare_flow(settings, out=None):
        received.append({"settings": settings, "out": out})
        counts = {"rows_in": 10, "kept": 8, "quarantined": 2, "quarantined.missing_image": 2}
        return {"counts": {**counts, "train": 6, "val": 1, "test": 1}, "fingerprint": "f" * 64}

    monkeypatch.setattr(flows.prepare, "prepare_flow", prepare_flow)
    return received


def test_flags_map_to_settings(fake_flow: list[dict[str, Any]], tmp_path: Path) -> None:
    args = [
        "prepare", "--source", "local", "--jsonl", str(FIXTURES / "mm_math_mini.jsonl"),
        "--images", str(FIXTURES / "images"), "--out", str(tmp_path / "prep"), "--max-image-size", "256",
        "--splits", "0.8,0.1,0.1", "--limit", "5", "--workers", "1", "--home", str(tmp_path), "--run-name", "r1",
    ]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    (call,) = fake_flow
    cfg = call["settings"].prepare
    assert cfg.source == "local" and cfg.jsonl == str(FIXTURES / "mm_math_mini.jsonl")
    assert cfg.images == str(FIXTURES / "images")
    assert (cfg.max_image_size, cfg.splits, cfg.limit, cfg.workers) == (256, (0.8, 0.1, 0.1), 5, 1)
    assert call["out"] == str(tmp_path / "prep")
    assert call["settings"].home == str(tmp_path) and call["settings"].run_name == "r1"
    assert "prepared 8 of 10 rows" in result.output and "train 6 · val 1 · test 1" in result.output
    assert "missing_image 2" in result.output


def test_defaults_come_from_settings(fake_flow: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MATHWIZARD_PREPARE__MAX_IMAGE_SIZE", "300")
    result = runner.invoke(app, ["prepare"])
    assert result.exit_code == 0, result.output
    cfg = fake_flow[0]["settings"].prepare
    assert (cfg.source, cfg.max_image_size, cfg.splits) == ("sample", 300, (0.9, 0.05, 0.05))
    assert fake_flow[0]["out"] is None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--source", "local"], "needs --jsonl"),
        (["--source", "local", "--jsonl", "nope.jsonl", "--images", "."], "nope.jsonl does not exist"),
        (["--source", "local", "--jsonl", str(FIXTURES / "mm_math_mini.jsonl")], "needs --images"),
        (["--splits", "0.5,0.5,0.5"], "splits must be three non-negative fractions summing to 1"),
        (["--splits", "ninety,five,five"], "splits must be three numbers"),
        (["--source", "kaggle"], "prepare.source"),
        (["--max-image-size", "4"], "prepare.max_image_size"),
        (["--source", "hub"], "HF_HUB_OFFLINE is set"),
    ],
)
def test_user_errors_are_one_line_and_exit_1(fake_flow: list[dict[str, Any]], args: list[str], message: str) -> None:
    result = runner.invoke(app, ["prepare", *args])
    assert result.exit_code == 1, result.output
    assert message in result.output
    assert "Traceback" not in result.output and result.output.count("error:") == 1
    assert fake_flow == []  # nothing started


def test_prepare_end_to_end_on_the_sample(prefect_harness, tmp_path: Path) -> None:
    args = ["prepare", "--source", "sample", "--home", str(tmp_path), "--workers", "2"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    # 60 bundled problems -> 51 / 4 / 5 (see tests/stages/test_prepare.py)
    assert "prepared 60 of 60 rows" in result.output and "train 51 · val 4 · test 5" in result.output
    out = tmp_path / "runs" / "default" / "01-prepare"
    assert {p.name for p in out.iterdir()} >= {
        "train-00000-of-00001.parquet", "val-00000-of-00001.parquet", "test-00000-of-00001.parquet",
        "quarantine.jsonl", "manifest.json",
    }  # fmt: skip
    manifest_before = (out / "manifest.json").read_text()
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and "prepared 60 of 60 rows" in again.output
    assert (out / "manifest.json").read_text() == manifest_before  # skipped: nothing rewritten
