"""The prepare stage end to end: bundled sample, local data with bad rows, growth, skipping and redoing by manifest."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import datasets
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mathwizard.config import PrepareConfig
from mathwizard.data.splits import SPLIT_FILES, read_dataset, read_table, split_of, split_path
from mathwizard.errors import DataError
from mathwizard.manifest import read_manifest
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
    return {i: split for split in SPLIT_FILES for i in pq.read_table(split_path(out, split))["id"].to_pylist()}


# ----------------------------------------------------------------------------------------- sample
def test_sample_produces_the_contracted_folder(sample_out: Path) -> None:
    manifest = json.loads((sample_out / "manifest.json").read_text())
    # 60 bundled problems, all valid; their ids put 51 in train, 4 in val, 5 in test (51 + 4 + 5 = 60);
    # 22 figures are wider or taller than 512 px and get shrunk.
    assert manifest["report"] == {
        "source": "sample", "resolved_revision": None, "rows_in": 60, "kept": 60, "quarantined": 0, "resized": 22,
        "quarantine_reasons": {}, "splits": {"train": 51, "val": 4, "test": 5}, "workers": 2,
    }  # fmt: skip
    report = prepare.Report.of(manifest)
    assert prepare.Report.of(read_manifest(sample_out)) == report
    assert report.summary() == "60 of 60 rows kept (train 51 · val 4 · test 5), 0 quarantined"
    assert set(manifest["files"]) == {*SPLIT_FILES.values(), "quarantine.jsonl"}
    assert manifest["files"]["val-00000-of-00001.parquet"]["rows"] == 4
    assert (sample_out / "quarantine.jsonl").read_text() == ""
    assert manifest["stage"] == "prepare" and manifest["version"] == prepare.VERSION
    assert manifest["fingerprint"] == prepare.expected_fingerprint(PrepareConfig())
    assert manifest["config"]["max_image_size"] == 512 and manifest["config"]["splits"] == [0.9, 0.05, 0.05]
    # The fetch and clean steps keep manifests of their own, chained by fingerprint up to the stage's.
    fetched, cleaned = read_manifest(sample_out / "raw"), read_manifest(sample_out / "clean")
    assert (fetched.stage, cleaned.stage) == ("prepare.fetch", "prepare.clean")
    assert fetched.fingerprint == prepare.fetch_fingerprint(PrepareConfig())
    assert cleaned.upstream == {"prepare.fetch": fetched.fingerprint}
    assert manifest["fingerprint"] == prepare.split_fingerprint(PrepareConfig(), cleaned.fingerprint)
    assert prepare.FetchReport.of(fetched).source == "sample" and prepare.FetchReport.of(fetched).records_file
    assert prepare.CleanReport.of(cleaned).kept == 60
    assert manifest["mathwizard_version"] and manifest["env"]["python"]


def test_splits_load_with_a_real_image_feature(sample_out: Path) -> None:
    files = {s: str(sample_out / name) for s, name in SPLIT_FILES.items()}
    loaded = datasets.load_dataset("parquet", data_files=files)
    assert {s: loaded[s].num_rows for s in loaded} == {"train": 51, "val": 4, "test": 5}
    assert isinstance(loaded["train"].features["image"], datasets.Image)
    assert list(loaded["train"].features) == [
        "id", "question", "solution", "image", "difficult", "year", "knowledge", "file_name",
    ]  # fmt: skip
    for row in read_dataset(sample_out, "test"):
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
    report = prepare.Report.of(small)
    assert report.kept == 10 and sum(report.splits.values()) == 10
    assert all(max(r["image"].size) <= 64 for r in read_dataset(out, "train"))


# --------------------------------------------------------------------------------------- local data
def test_local_data_with_bad_rows_counts_every_reason(tmp_path: Path) -> None:
    rows = (FIXTURES / "mm_math_mini.jsonl").read_text().splitlines()  # 8 rows, 2 figures
    bad = [
        rows[0],  # line 9: exact duplicate of line 1
        "{broken json",  # line 10
        json.dumps({**json.loads(rows[1]), "question": "Another problem on a lost figure", "file_name": "gone.png"}),
        json.dumps({**json.loads(rows[2]), "question": "Escape", "file_name": "../mm_math_mini.jsonl"}),
        json.dumps({**json.loads(rows[3]), "knowledge": ""}),  # line 13
        # lines 14 and 15: over the default limits (10,000 and 20,000 characters), as a 5 MB question would be
        json.dumps({**json.loads(rows[4]), "question": "Find $x$. " + "$x+1=2$ " * 1300}),
        json.dumps({**json.loads(rows[5]), "question": "Long", "solution": r"$x=\boxed{1}$ " * 1500}),
    ]
    jsonl = tmp_path / "MM_Math.jsonl"
    jsonl.write_text("\n".join(rows + bad) + "\n")
    cfg = PrepareConfig(source="local", jsonl=str(jsonl), images=str(FIXTURES / "images"), workers=1)
    manifest = prepare.run(cfg, tmp_path / "out")
    report = prepare.Report.of(manifest)
    assert (report.rows_in, report.kept, report.quarantined) == (15, 8, 7)  # 8 good + 7 bad
    assert report.splits == {"train": 7, "val": 0, "test": 1}  # 8 kept rows; their ids leave val empty
    empty = read_table(tmp_path / "out", "val")  # an empty split is still a file, with its features
    assert empty.num_rows == 0
    assert isinstance(datasets.Features.from_arrow_schema(empty.schema)["image"], datasets.Image)
    assert report.quarantine_reasons == {
        "blank_field": 1,
        "duplicate": 1,
        "malformed_json": 1,
        "missing_image": 1,
        "too_long": 2,
        "unsafe_path": 1,
    }
    assert list(report.quarantine_reasons) == sorted(report.quarantine_reasons)  # stable order in the manifest
    lines = [json.loads(x) for x in (tmp_path / "out" / "quarantine.jsonl").read_text().splitlines()]
    assert [(q["line"], q["reason"]) for q in lines] == [
        (9, "duplicate"), (10, "malformed_json"), (11, "missing_image"), (12, "unsafe_path"), (13, "blank_field"),
        (14, "too_long"), (15, "too_long"),
    ]  # fmt: skip
    assert [q["detail"] for q in lines[-2:]] == [
        "question is 10,409 characters, over the limit of 10,000",  # its ends stripped
        "solution is 20,999 characters, over the limit of 20,000",
    ]
    assert manifest.files["quarantine.jsonl"].rows == 7


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


# ------------------------------------------------------------------------------------------ skip and redo
@pytest.fixture
def written(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The (sub-)stages that write their folder during the test, in order (each goes through stage_output)."""
    steps: list[str] = []
    real = prepare.stage_output

    def spy(folder, **kwargs):
        steps.append(kwargs["stage"])
        return real(folder, **kwargs)

    monkeypatch.setattr(prepare, "stage_output", spy)
    return steps


def test_a_deleted_or_truncated_split_is_redone_from_the_clean_step(
    sample_out: Path, tmp_path: Path, written: list[str]
) -> None:
    out = tmp_path / "01-prepare"
    shutil.copytree(sample_out, out)
    before = read_manifest(out)
    cfg = PrepareConfig(workers=1)

    assert prepare.run(cfg, out) == before and written == []  # intact: skipped, nothing written
    (out / SPLIT_FILES["val"]).unlink()
    redone = prepare.run(cfg, out)
    assert written == ["prepare"]  # fetch and clean found their own intact manifests: only the split ran again
    assert redone.fingerprint == before.fingerprint and redone.files == before.files  # the same bytes again

    train = out / SPLIT_FILES["train"]
    train.write_bytes(train.read_bytes()[:1000])  # truncated, e.g. by a full disk
    assert prepare.run(cfg, out).files == before.files and written == ["prepare", "prepare"]


def test_a_damaged_clean_step_is_redone_too(sample_out: Path, tmp_path: Path, written: list[str]) -> None:
    out = tmp_path / "01-prepare"
    shutil.copytree(sample_out, out)
    (out / "manifest.json").unlink()  # the stage must run ...
    (out / "clean" / "clean.parquet").unlink()  # ... and its clean step's output is gone
    again = prepare.run(PrepareConfig(workers=1), out)
    assert written == ["prepare", "prepare.clean"]  # the stage, inside it clean again; fetch was intact
    assert again.fingerprint == read_manifest(sample_out).fingerprint and again.files == read_manifest(sample_out).files


def test_stable_split_keeps_last_weeks_test_rows_out_of_training(tmp_path: Path) -> None:
    """Weekly retraining on grown data: week 1 sees the first 40 sample rows, week 2 all 60."""
    lines = prepare.fetching.SAMPLE_JSONL.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 60
    ids: list[dict[str, set[str]]] = []
    for week, rows in (("week1", lines[:40]), ("week2", lines)):
        jsonl = tmp_path / f"{week}.jsonl"
        jsonl.write_text("\n".join(rows) + "\n", encoding="utf-8")
        images = str(prepare.fetching.SAMPLE_IMAGES)
        cfg = PrepareConfig(source="local", jsonl=str(jsonl), images=images, max_image_size=64, workers=1)
        assert prepare.Report.of(prepare.run(cfg, tmp_path / week)).kept == len(rows)
        ids.append(
            {split: set(read_table(tmp_path / week, split, ["id"]).column("id").to_pylist()) for split in SPLIT_FILES}
        )
    old, new = ids
    # Every old row keeps its split: the split is a salted hash of the row's content, not of its position.
    for split in SPLIT_FILES:
        assert old[split] <= new[split], split
    assert not old["test"] & (new["train"] | new["val"])
    added = set().union(*new.values()) - set().union(*old.values())
    assert len(added) == 20  # 60 rows - 40 seen last week
