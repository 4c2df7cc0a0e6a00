"""A figure that crashes the decoder (a segfault in Pillow's C code) is quarantined; every other row stays as it was.

The crash is injected with the test-only hook named by `TEST_CRASH_ENV`: the image worker that gets a named figure
kills itself (SIGSEGV, or `name:exit` -> os._exit(139)) before decoding it, as a crashing decoder would.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from mathwizard.config import PrepareConfig
from mathwizard.data.clean import (
    TEST_CRASH_ENV,
    CleanReport,
    _death_cause,
    _test_crash_targets,
    clean_dataset,
    clean_images,
)
from mathwizard.data.splits import SPLIT_FILES
from mathwizard.stages import prepare
from tests.datasrc.mm_math_builders import draw_figure, good_row, write_jsonl

ROWS = 40  # > 16, so workers=2 really runs two processes
SEGV = "image decoder crashed (worker died: signal SIGSEGV)"
EXIT = "image decoder crashed (worker died: exit code 139)"


def _dataset(folder: Path, skip: tuple[int, ...] = ()) -> tuple[Path, Path]:
    """ROWS good rows (figure i is `i.png`, line i + 1) minus `skip`; figures of varied size, all shrunk."""
    images = folder / "images"
    for i in range(ROWS):
        if not (images / f"{i}.png").exists():
            draw_figure(images / f"{i}.png", size=(90 + 7 * i, 50), mode="LA" if i % 3 else "P")
    return write_jsonl(folder / "MM_Math.jsonl", [good_row(i) for i in range(ROWS) if i not in skip]), images


def _clean(jsonl: Path, images: Path, out: Path, workers: int) -> tuple[CleanReport, list[dict]]:
    report = clean_dataset(
        jsonl, images, out / "clean.parquet", out / "quarantine.jsonl",
        salt="s", max_size=64, max_pixels=1_000_000, workers=workers, batch_rows=7,
    )  # fmt: skip
    return report, [json.loads(line) for line in (out / "quarantine.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run without any crash: the parquet every crashing run must match, less the crashing rows."""
    folder = tmp_path_factory.mktemp("reference")
    report, quarantined = _clean(*_dataset(folder), folder, workers=2)
    assert (report.kept, quarantined) == (ROWS, [])
    return folder / "clean.parquet"


def _names(parquet: Path) -> list[str]:
    return pq.read_table(parquet).column("file_name").to_pylist()


# ------------------------------------------------------------------------------------------- one crash
@pytest.mark.parametrize("workers", [1, 2])
def test_a_crashing_figure_is_quarantined_and_every_other_row_kept(
    tmp_path: Path, reference: Path, workers: int, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv(TEST_CRASH_ENV, "7.png")
    with caplog.at_level(logging.WARNING, logger="mathwizard.data.clean"):
        report, quarantined = _clean(*_dataset(tmp_path), tmp_path, workers=workers)

    assert (report.rows_in, report.kept, report.quarantined) == (40, 39, 1)  # 40 rows - 1 crashing figure
    assert report.by_reason == {"decoder_crashed": 1}
    assert quarantined == [{"line": 8, "file_name": "7.png", "reason": "decoder_crashed", "detail": SEGV}]
    # it killed its worker, then a fresh one it had to itself: two deaths before the quarantine
    deaths = [r.getMessage() for r in caplog.records if "7.png" in r.getMessage()]
    assert len(deaths) == 2 and "retrying it alone" in deaths[0] and "second, fresh image worker" in deaths[1]

    # byte-identical to a crash-free run of the same rows without line 8 (its queued neighbours were not lost)
    monkeypatch.delenv(TEST_CRASH_ENV)
    without = tmp_path / "without"
    _, none_quarantined = _clean(*_dataset(without, skip=(7,)), without, workers=workers)
    assert none_quarantined == []
    assert (tmp_path / "clean.parquet").read_bytes() == (without / "clean.parquet").read_bytes()
    # and the same rows, in the same order, as the full crash-free run minus the crashing one
    table, full = pq.read_table(tmp_path / "clean.parquet"), pq.read_table(reference)
    assert table.to_pylist() == [row for row in full.to_pylist() if row["file_name"] != "7.png"]
    assert _names(tmp_path / "clean.parquet") == [f"{i}.png" for i in range(40) if i != 7]


# ------------------------------------------------------------------------------------------ two crashes
@pytest.mark.parametrize(
    ("targets", "crashing", "details"),
    [
        ("3.png,35.png:exit", (3, 35), (SEGV, EXIT)),  # far apart: different workers' queues
        ("20.png,21.png", (20, 21), (SEGV, SEGV)),  # neighbours: likely the same worker's queue
    ],
)
def test_two_crashing_figures(
    tmp_path: Path, reference: Path, monkeypatch: pytest.MonkeyPatch, targets: str, crashing: tuple, details: tuple
) -> None:
    monkeypatch.setenv(TEST_CRASH_ENV, targets)
    report, quarantined = _clean(*_dataset(tmp_path), tmp_path, workers=2)

    assert (report.rows_in, report.kept, report.quarantined) == (40, 38, 2)  # 40 rows - 2 crashing figures
    assert quarantined == [
        {"line": i + 1, "file_name": f"{i}.png", "reason": "decoder_crashed", "detail": detail}
        for i, detail in zip(crashing, details, strict=True)
    ]
    full = pq.read_table(reference).to_pylist()
    kept = [row for row in full if row["file_name"] not in {f"{i}.png" for i in crashing}]
    assert len(kept) == 38 and pq.read_table(tmp_path / "clean.parquet").to_pylist() == kept


# ------------------------------------------------------------------------------------------- the stage
def test_prepare_stage_survives_a_crash_with_the_same_splits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    jsonl, images = _dataset(tmp_path / "data")
    monkeypatch.setenv(TEST_CRASH_ENV, "12.png")
    cfg = PrepareConfig(source="local", jsonl=str(jsonl), images=str(images), max_image_size=64, workers=2)
    report = prepare.Report.of(prepare.run(cfg, tmp_path / "crash"))
    assert (report.rows_in, report.kept, report.quarantined) == (40, 39, 1)  # 40 rows - 1 crashing
    assert sum(report.splits.values()) == 39
    assert report.quarantine_reasons == {"decoder_crashed": 1}
    assert json.loads((tmp_path / "crash" / "quarantine.jsonl").read_text()) == {
        "line": 13, "file_name": "12.png", "reason": "decoder_crashed", "detail": SEGV,
    }  # fmt: skip

    # the same rows without line 13 and without the hook: the very same split files, byte for byte
    monkeypatch.delenv(TEST_CRASH_ENV)
    other = tmp_path / "data-without"
    shutil.copytree(images, other / "images")
    jsonl_without, _ = _dataset(other, skip=(12,))
    cfg = cfg.model_copy(update={"jsonl": str(jsonl_without), "images": str(other / "images")})
    clean_report = prepare.Report.of(prepare.run(cfg, tmp_path / "clean"))
    assert (clean_report.quarantined, clean_report.splits) == (0, report.splits)
    for name in SPLIT_FILES.values():
        assert (tmp_path / "crash" / name).read_bytes() == (tmp_path / "clean" / name).read_bytes(), name


# ---------------------------------------------------------------------------------- hook and failures
def test_the_hook_is_inert_unless_its_variable_is_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TEST_CRASH_ENV, raising=False)
    assert _test_crash_targets() == {}
    monkeypatch.setenv(TEST_CRASH_ENV, " a.png, b.png:exit ,")
    assert _test_crash_targets() == {"a.png": "segv", "b.png": "exit"}


def test_death_causes_in_words() -> None:
    assert _death_cause(-11) == "signal SIGSEGV"
    assert _death_cause(-9) == "signal SIGKILL"
    assert _death_cause(139) == "exit code 139"
    assert _death_cause(-200) == "signal 200"  # no such signal name


def test_a_python_error_in_a_worker_is_raised_not_quarantined(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TEST_CRASH_ENV, raising=False)
    # A None path is a bug in the caller: PIL raises AttributeError, which clean_image does not turn into a reason.
    with pytest.raises(AttributeError) as info:
        list(clean_images([None], 64, 1_000_000, workers=1))  # type: ignore[list-item]
    assert "in an image worker" in str(info.value.__cause__)
    assert not [p for p in multiprocessing.active_children() if p.name == "mathwizard-clean-image"]


def test_stopping_early_leaves_no_worker_behind(tmp_path: Path) -> None:
    paths = [str(draw_figure(tmp_path / f"{i}.png")) for i in range(20)]
    results = clean_images(paths, 32, 1_000_000, workers=2)
    assert next(results).png
    results.close()  # the consumer gave up after one row
    assert not [p for p in multiprocessing.active_children() if p.name == "mathwizard-clean-image"]


def test_workers_start_when_the_main_script_is_read_from_stdin(tmp_path: Path) -> None:
    """`python - <<EOF` names its main '<stdin>', a file that does not exist; forkserver children re-run the main
    script by path, so every worker died at start (seen on the GPU machine) until that name is hidden from them."""
    import subprocess
    import sys

    jsonl, images = _dataset(tmp_path)
    script = (
        "import sys\n"
        "from pathlib import Path as P\n"
        "from mathwizard.data.clean import clean_dataset\n"
        f"r = clean_dataset(P({str(jsonl)!r}), P({str(images)!r}), P({str(tmp_path / 'c.parquet')!r}),"
        f" P({str(tmp_path / 'q.jsonl')!r}), salt='s', max_size=64, max_pixels=1_000_000, workers=2, batch_rows=7)\n"
        "print('kept', r.kept)\n"
    )
    done = subprocess.run([sys.executable, "-"], input=script, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"kept {ROWS}" in done.stdout
