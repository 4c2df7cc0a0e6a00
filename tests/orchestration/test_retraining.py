"""Weekly retraining on grown data: last week's test rows stay out of training, and only new rows cost API calls.

Uses the stage libraries directly (what the scheduled `math-wizard/gemma-3n-e2b` deployment runs, minus Prefect):
week 1 sees the first 40 rows of the bundled sample, week 2 all 60; the teacher is the OpenAI-compatible test server.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from mathwizard.config import PrepareConfig, TeacherConfig
from mathwizard.data.fetch import SAMPLE_IMAGES, SAMPLE_JSONL
from mathwizard.data.splits import split_file
from mathwizard.stages import prepare, teach
from mathwizard.testing.openai_server import OpenAITestServer

SPLITS = ("train", "val", "test")


def ids(folder: Path) -> dict[str, set[str]]:
    return {
        split: set(pq.read_table(split_file(folder, split), columns=["id"]).column("id").to_pylist())
        for split in SPLITS
    }


@pytest.fixture
def weeks(tmp_path: Path) -> tuple[Path, Path]:
    """The prepare folders of week 1 (40 rows) and week 2 (the same 40 plus 20 new)."""
    lines = SAMPLE_JSONL.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 60
    folders = []
    for week, rows in (("week1", lines[:40]), ("week2", lines)):
        jsonl = tmp_path / f"{week}.jsonl"
        jsonl.write_text("\n".join(rows) + "\n", encoding="utf-8")
        cfg = PrepareConfig(source="local", jsonl=str(jsonl), images=str(SAMPLE_IMAGES), max_image_size=64, workers=1)
        out = tmp_path / week / "01-prepare"
        manifest = prepare.run(cfg, out)
        assert manifest.counts["kept"] == len(rows)
        folders.append(out)
    return folders[0], folders[1]


def test_stable_split_keeps_old_test_rows_out_of_training(weeks: tuple[Path, Path]) -> None:
    old, new = ids(weeks[0]), ids(weeks[1])
    # Every old row keeps its split: the split is a salted hash of the row's content, not of its position.
    for split in SPLITS:
        assert old[split] <= new[split], split
    assert not old["test"] & (new["train"] | new["val"])
    added = set().union(*new.values()) - set().union(*old.values())
    assert len(added) == 20  # 60 rows - 40 seen last week


def test_teacher_cache_makes_only_new_rows_cost_api_calls(
    weeks: tuple[Path, Path], tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("MATHWIZARD_TEACHER_API_KEY", "sk-test-dummy")  # only ever sent to the local test server
    cache = tmp_path / "cache"  # <home>/cache: shared by every run of the artifact root
    with OpenAITestServer(latency=0.0) as server:
        cfg = TeacherConfig(kind="openai", base_url=server.base_url, concurrency=4, rpm=None)
        first = teach.run(cfg, weeks[0], tmp_path / "week1" / "02-teach", cache)
        assert first.counts["written"] == 40
        assert server.requests == 40  # one request per row, none cached yet

        server.reset_counts()
        second = teach.run(cfg, weeks[1], tmp_path / "week2" / "02-teach", cache)
        assert second.counts["written"] == 60
        assert second.counts["cache_hits"] == 40
        assert server.requests == 20  # 60 rows - 40 answered last week
