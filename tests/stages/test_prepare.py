"""The prepare stage end to end: bundled sample, local data with bad rows, growth, skipping; Prefect tasks and flow."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import datasets
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mathwizard.config import PrepareConfig, load_settings
from mathwizard.data.splits import SPLIT_FILES, load_split, split_file, split_of
from mathwizard.errors import DataError
from mathwizard.stages import prepare

FIXTURES = Path(__file__).parent.parent / "data"


@pytest.fixture(scope="module")
def sample_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("prepare") / "01-prepare"
    prepare.run(PrepareConfig(workers=2), out)
    return out


def _copy_rows(jsonl: Path, images: Path, rows: list[str], folder: Path) -> tuple[Path, Path]:
    """A local MM_Math copy holding `rows` (jsonl lines) of the bundled sample and their figures."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for line in rows:
        name = json.loads(line)["file_name"]
        shutil.copyfile(images / name, folder / "images" / name)
    (folder / "MM_Math.jsonl").write_text("".join(line + "\n" for line in rows), encoding="utf-8")
    return folder / "MM_Math.jsonl", folder / "images"


def _ids(out: Path) -> dict[str, str]:
    """Row id -> split of a prepared folder."""
    return {i: split for split in SPLIT_FILES for i in pq.read_table(split_file(out, split))["id"].to_pylist()}


# ----------------------------------------------------------------------------------------- sample
def test_sample_produces_the_contracted_folder(sample_out: Path) -> None:
    manifest = json.loads((sample_out / "manifest.json").read_text())
    # 60 bundled problems, all valid; their ids put 51 in train, 4 in val, 5 in test (51 + 4 + 5 = 60);
    # 22 figures are wider or taller than 512 px and get shrunk.
    assert manifest["counts"] == {
        "rows_in": 60, "kept": 60, "quarantined": 0, "resized": 22, "train": 51, "val": 4, "test": 5,
    }  # fmt: skip
    assert set(manifest["files"]) == {*SPLIT_FILES.values(), "quarantine.jsonl"}
    assert manifest["files"]["val-00000-of-00001.parquet"]["rows"] == 4
    assert (sample_out / "quarantine.jsonl").read_text() == ""
    assert manifest["stage"] == "prepare" and manifest["version"] == prepare.VERSION
    assert manifest["fingerprint"] == prepare.expected_fingerprint(PrepareConfig())
    assert manifest["config"]["max_image_size"] == 512 and manifest["config"]["splits"] == [0.9, 0.05, 0.05]
    assert manifest["extra"]["inputs"]["source"] == "sample" and len(manifest["extra"]["inputs"]["fingerprint"]) == 64
    assert set(manifest["extra"]["timings"]) == {"fetch_s", "clean_s", "split_s"}
    assert manifest["mathwizard_version"] and manifest["env"]["python"]


def test_splits_load_with_a_real_image_feature(sample_out: Path) -> None:
    files = {s: str(sample_out / name) for s, name in SPLIT_FILES.items()}
    loaded = datasets.load_dataset("parquet", data_files=files)
    assert {s: loaded[s].num_rows for s in loaded} == {"train": 51, "val": 4, "test": 5}
    assert isinstance(loaded["train"].features["image"], datasets.Image)
    assert list(loaded["train"].features) == [
        "id", "question", "solution", "image", "difficult", "year", "knowledge", "file_name",
    ]  # fmt: skip
    for row in load_split(sample_out, "test"):
        assert isinstance(row["image"], Image.Image)
        assert row["image"].mode == "RGB" and max(row["image"].size) <= 512
        assert row["solution"].startswith(r"\textbf{Solution:}") and r"\boxed{" in row["solution"]
        assert split_of(row["id"], (0.9, 0.05, 0.05)) == "test"


def test_second_run_is_skipped_and_a_setting_change_redoes_it(sample_out: Path, tmp_path: Path) -> None:
    before = (sample_out / "manifest.json").read_text()
    again = prepare.run(PrepareConfig(workers=1), sample_out)  # workers do not change the output
    assert (sample_out / "manifest.json").read_text() == before
    assert again.fingerprint == json.loads(before)["fingerprint"]
    out = tmp_path / "small"
    shutil.copytree(sample_out, out)
    small = prepare.run(PrepareConfig(max_image_size=64, limit=10, workers=1), out)
    assert small.fingerprint != again.fingerprint
    assert small.counts["kept"] == 10 and small.counts["train"] + small.counts["val"] + small.counts["test"] == 10
    assert all(max(r["image"].size) <= 64 for r in load_split(out, "train"))


# --------------------------------------------------------------------------------------- local data
def test_local_data_with_bad_rows_counts_every_reason(tmp_path: Path) -> None:
    rows = (FIXTURES / "mm_math_mini.jsonl").read_text().splitlines()  # 8 rows, 2 figures
    bad = [
        rows[0],  # line 9: exact duplicate of line 1
        "{broken json",  # line 10
        json.dumps({**json.loads(rows[1]), "question": "Another problem on a lost figure", "file_name": "gone.png"}),
        json.dumps({**json.loads(rows[2]), "question": "Escape", "file_name": "../mm_math_mini.jsonl"}),
        json.dumps({**json.loads(rows[3]), "knowledge": ""}),  # line 13
    ]
    jsonl = tmp_path / "MM_Math.jsonl"
    jsonl.write_text("\n".join(rows + bad) + "\n")
    cfg = PrepareConfig(source="local", jsonl=str(jsonl), images=str(FIXTURES / "images"), workers=1)
    manifest = prepare.run(cfg, tmp_path / "out")
    counts = manifest.counts
    assert (counts["rows_in"], counts["kept"], counts["quarantined"]) == (13, 8, 5)  # 8 good + 5 bad
    assert (counts["train"], counts["val"], counts["test"]) == (7, 0, 1)  # 8 kept rows; their ids leave val empty
    empty = load_split(tmp_path / "out", "val")  # an empty split still loads, with its features
    assert empty.num_rows == 0 and isinstance(empty.features["image"], datasets.Image)
    assert {k: v for k, v in counts.items() if k.startswith("quarantined.")} == {
        "quarantined.duplicate": 1,
        "quarantined.malformed_json": 1,
        "quarantined.missing_image": 1,
        "quarantined.unsafe_path": 1,
        "quarantined.blank_field": 1,
    }
    assert manifest.extra["quarantine_reasons"]["unsafe_path"] == 1
    lines = [json.loads(x) for x in (tmp_path / "out" / "quarantine.jsonl").read_text().splitlines()]
    assert [(q["line"], q["reason"]) for q in lines] == [
        (9, "duplicate"), (10, "malformed_json"), (11, "missing_image"), (12, "unsafe_path"), (13, "blank_field"),
    ]  # fmt: skip
    assert manifest.files["quarantine.jsonl"].rows == 5


def test_growth_never_moves_an_existing_row(tmp_path: Path) -> None:
    sample = prepare.fetching
    lines = sample.SAMPLE_JSONL.read_text().splitlines()
    jsonl, images = _copy_rows(sample.SAMPLE_JSONL, sample.SAMPLE_IMAGES, lines[:40], tmp_path / "v1")
    cfg = PrepareConfig(source="local", jsonl=str(jsonl), images=str(images), max_image_size=32, workers=1)
    prepare.run(cfg, tmp_path / "out-v1")
    before = _ids(tmp_path / "out-v1")
    # v2: 20 new problems, some inserted before the old ones, and the old ones in reverse order.
    grown = lines[50:] + lines[:40][::-1] + lines[40:50]
    jsonl, images = _copy_rows(sample.SAMPLE_JSONL, sample.SAMPLE_IMAGES, grown, tmp_path / "v2")
    prepare.run(cfg.model_copy(update={"jsonl": str(jsonl), "images": str(images)}), tmp_path / "out-v2")
    after = _ids(tmp_path / "out-v2")
    assert len(before) == 40 and len(after) == 60
    assert {row_id: after[row_id] for row_id in before} == before
    assert set(before.values()) == {"train", "val", "test"}  # every split had rows that could have moved


def test_no_usable_row_is_a_data_error_with_the_quarantine_kept(tmp_path: Path) -> None:
    jsonl = tmp_path / "MM_Math.jsonl"
    jsonl.write_text('{"question": "x"}\nnot json\n')
    cfg = PrepareConfig(source="local", jsonl=str(jsonl), images=str(FIXTURES / "images"))
    with pytest.raises(DataError, match=r"all 2 were quarantined"):
        prepare.run(cfg, tmp_path / "out")
    assert len((tmp_path / "out" / "clean" / "quarantine.jsonl").read_text().splitlines()) == 2
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_steps_need_their_upstream(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="run `mathwizard prepare` first"):
        prepare.clean(PrepareConfig(), tmp_path / "raw", tmp_path / "clean")


# -------------------------------------------------------------------------------------------- Prefect
def test_task_policies() -> None:
    from tasks import prepare as tasks

    assert (tasks.fetch.name, tasks.clean.name, tasks.split.name) == ("fetch", "clean", "split")
    assert tasks.fetch.retries == 3 and tasks.fetch.retry_condition_fn is not None
    assert tasks.clean.retries == 0 and tasks.split.retries == 0
    assert all(t.cache_key_fn is not None and t.persist_result for t in (tasks.fetch, tasks.clean, tasks.split))


def test_flow_runs_once_then_comes_from_cache(prefect_harness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.prepare import prepare_flow
    from tasks import prepare as tasks

    calls: list[str] = []

    def counting(step: str):
        real = getattr(prepare, step)

        def wrapper(*args, **kwargs):
            calls.append(step)
            return real(*args, **kwargs)

        return wrapper

    for step in ("fetch", "clean", "split"):
        monkeypatch.setattr(tasks.prepare, step, counting(step))
    settings = load_settings(home=str(tmp_path / "home"), prepare={"limit": 12, "workers": 1})
    first = prepare_flow(settings=settings)
    assert calls == ["fetch", "clean", "split"]
    assert first["counts"]["kept"] == 12
    assert _artifact_rows("prepare-counts")[:2] == [{"what": "rows read", "count": 12}, {"what": "kept", "count": 12}]
    second = prepare_flow(settings=settings)
    assert calls == ["fetch", "clean", "split"]  # nothing ran: all three results came from Prefect's cache
    assert second == first
    # A deleted stage manifest makes the split step run again (its cached result would point at nothing).
    (Path(settings.stage_dir("prepare")) / "manifest.json").unlink()
    third = prepare_flow(settings=settings)
    assert calls == ["fetch", "clean", "split", "split"]
    assert third["fingerprint"] == first["fingerprint"]


def _artifact_rows(key: str) -> list[dict]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    # Other flow tests in the session write the same key: read the newest one.
    with get_client(sync_client=True) as client:
        (artifact,) = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])), sort=ArtifactSort.CREATED_DESC, limit=1
        )
    data = artifact.data
    return json.loads(data) if isinstance(data, str) else data
