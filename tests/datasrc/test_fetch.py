"""Fetching: every known MM_Math layout, built here as the Hub would serve it; safe extraction; clear failures."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
import zipfile
from pathlib import Path

import httpx
import huggingface_hub
import pytest
from huggingface_hub import constants
from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

from mathwizard.config import PrepareConfig
from mathwizard.data import fetch as fetching
from mathwizard.errors import DataError, TransientError, is_transient
from mathwizard.stages import prepare
from tests.datasrc.mm_math_builders import draw_figure, good_row, write_jsonl

N = 5
COMMIT = "a" * 40  # a pinned revision: nothing asks the Hub which commit `main` is


def _figures(folder: Path, prefix: str = "") -> None:
    for i in range(N):
        draw_figure(folder / prefix / f"{i}.png")


def _zip(path: Path, source: Path, arc_prefix: str = "") -> None:
    with zipfile.ZipFile(path, "w") as zf:
        for file in sorted(source.rglob("*")):
            zf.write(file, arc_prefix + file.relative_to(source).as_posix())


def _build_layout(kind: str, root: Path) -> Path:
    """A MM_Math copy as one revision of the Hub repo laid it out; returns its folder."""
    rows = [good_row(i) for i in range(N)]
    root.mkdir(parents=True)
    (root / "README.md").write_text("---\nlicense: mit\n---\n")
    (root / ".gitattributes").write_text("*.zip filter=lfs\n")
    figures = root.parent / f"{kind}-figures"
    _figures(figures)
    if kind == "jsonl+zip":  # the current card: MM_Math.jsonl + MM_Math.zip, figures at the top
        write_jsonl(root / "MM_Math.jsonl", rows)
        _zip(root / "MM_Math.zip", figures)
    elif kind == "jsonl+Image.zip":  # Image.zip wrapping a folder, with macOS junk beside it
        write_jsonl(root / "MM_Math.jsonl", rows)
        _zip(root / "Image.zip", figures, arc_prefix="Image/")
        with zipfile.ZipFile(root / "Image.zip", "a") as zf:
            zf.writestr("__MACOSX/Image/._0.png", b"junk")
    elif kind == "json+image.tar":  # the old revision: a json list with image_file_name, image.tar
        legacy = []
        for row in rows:
            row = dict(row, image_file_name=row.pop("file_name"), solution_image=None)
            legacy.append(row)
        (root / "MM_Math.json").write_text(json.dumps(legacy))
        with tarfile.open(root / "image.tar", "w") as tf:
            tf.add(figures, arcname="MM_Math/image")
        with tarfile.open(root / "solution_image.tar", "w") as tf:  # must not be taken for the figures
            tf.add(figures / "0.png", arcname="0.png")
    elif kind == "folder":  # a plain folder of figures next to the jsonl
        write_jsonl(root / "data" / "MM_Math.jsonl", rows)
        shutil.copytree(figures, root / "data" / "images")
    return root


LAYOUTS = {
    "jsonl+zip": ("MM_Math.jsonl", "MM_Math.zip"),
    "jsonl+Image.zip": ("MM_Math.jsonl", "Image.zip"),
    "json+image.tar": ("MM_Math.json", "image.tar"),
    "folder": ("MM_Math.jsonl", "images"),
}


@pytest.mark.parametrize("kind", LAYOUTS)
def test_detect_layout(tmp_path: Path, kind: str) -> None:
    layout = fetching.detect_layout(_build_layout(kind, tmp_path / "repo"))
    assert (layout.records.name, layout.images.name) == LAYOUTS[kind]


@pytest.mark.parametrize("kind", LAYOUTS)
def test_hub_source_fetches_and_cleans_every_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    repo = _build_layout(kind, tmp_path / "repo")
    calls: list[dict] = []

    def fake_snapshot_download(repo_id: str, **kwargs) -> str:
        calls.append({"repo_id": repo_id, **kwargs})
        shutil.copytree(repo, kwargs["local_dir"], dirs_exist_ok=True)
        return str(kwargs["local_dir"])

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    cfg = PrepareConfig(source="hub", hub_revision=COMMIT, workers=1)
    fetched = prepare.fetch(cfg, tmp_path / "raw")
    assert calls == [
        {"repo_id": "THU-KEG/MM_Math", "repo_type": "dataset", "revision": COMMIT, "local_dir": tmp_path / "raw/hub"}
    ]
    where = prepare.FetchReport.of(fetched)
    assert where.layout["records"] == LAYOUTS[kind][0] and where.source == "hub"
    assert where.resolved_revision == COMMIT  # recorded for lineage (dataset and model cards)
    assert not Path(where.images_root).is_absolute()  # inside the raw folder: downloaded or extracted there
    cleaned = prepare.CleanReport.of(prepare.clean(cfg, tmp_path / "raw", tmp_path / "clean"))
    assert (cleaned.rows_in, cleaned.kept, cleaned.quarantined) == (N, N, 0)


def test_local_source_with_an_archive_or_a_whole_folder(tmp_path: Path) -> None:
    repo = _build_layout("jsonl+Image.zip", tmp_path / "repo")
    by_files = PrepareConfig(source="local", jsonl=str(repo / "MM_Math.jsonl"), images=str(repo / "Image.zip"))
    fetched = prepare.FetchReport.of(prepare.fetch(by_files, tmp_path / "a"))
    assert fetched.images_root == "images/Image"  # nested folder found by probing the rows' file names
    assert prepare.CleanReport.of(prepare.clean(by_files, tmp_path / "a", tmp_path / "a-clean")).kept == N
    by_folder = PrepareConfig(source="local", jsonl=str(_build_layout("folder", tmp_path / "repo2")))
    fetched = prepare.FetchReport.of(prepare.fetch(by_folder, tmp_path / "b"))
    assert Path(fetched.images_root) == (tmp_path / "repo2/data/images").resolve()  # a folder is used in place
    assert prepare.CleanReport.of(prepare.clean(by_folder, tmp_path / "b", tmp_path / "b-clean")).kept == N


def test_image_root_is_found_for_prefixed_file_names(tmp_path: Path) -> None:
    _figures(tmp_path / "x" / "MM_Math", prefix="images")
    names = [f"images/{i}.png" for i in range(N)]
    assert fetching.find_image_root(tmp_path / "x", names) == tmp_path / "x" / "MM_Math"


def test_detect_layout_failures(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no \.jsonl or \.json records file"):
        fetching.detect_layout(tmp_path / "empty")
    write_jsonl(tmp_path / "noimg" / "MM_Math.jsonl", [good_row(1)])
    with pytest.raises(DataError, match="no image folder"):
        fetching.detect_layout(tmp_path / "noimg")


# --------------------------------------------------------------------------------------- extraction
def test_zip_extraction_skips_traversal_absolute_and_links(tmp_path: Path) -> None:
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("ok/1.png", b"fine")
        zf.writestr("../escape.png", b"x")
        zf.writestr("/abs.png", b"x")
        zf.writestr("a\\..\\..\\win.png", b"x")
        link = zipfile.ZipInfo("ok/link.png")
        link.external_attr = 0o120777 << 16  # a symlink entry whose target is /etc/passwd
        zf.writestr(link, "/etc/passwd")
    dest = tmp_path / "out" / "images"
    assert fetching.extract_archive(archive, dest) == 4
    assert [p.relative_to(dest).as_posix() for p in sorted(dest.rglob("*"))] == ["ok", "ok/1.png"]
    assert not (tmp_path / "escape.png").exists() and not (tmp_path / "out" / "escape.png").exists()


def test_tar_extraction_skips_links_devices_and_traversal(tmp_path: Path) -> None:
    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:

        def add(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", target: str = "") -> None:
            info = tarfile.TarInfo(name)
            info.type, info.size, info.linkname = kind, len(data), target
            tf.addfile(info, io.BytesIO(data) if data else None)

        add("figs/1.png", data=b"fine")
        add("../up.png", data=b"x")
        add("/etc/abs.png", data=b"x")
        add("figs/sym.png", tarfile.SYMTYPE, target="/etc/passwd")
        add("figs/hard.png", tarfile.LNKTYPE, target="figs/1.png")
        add("figs/fifo", tarfile.FIFOTYPE)
    dest = tmp_path / "dest"
    assert fetching.extract_archive(archive, dest) == 5
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*")) == ["figs", "figs/1.png"]
    assert not any(p.is_symlink() for p in dest.rglob("*"))


def test_broken_archive_is_a_data_error(tmp_path: Path) -> None:
    archive = tmp_path / "images.zip"
    archive.write_bytes(b"PK\x03\x04 this is not really a zip")
    with pytest.raises(DataError, match="neither a zip nor a tar"):
        fetching.extract_archive(archive, tmp_path / "x")
    good = tmp_path / "good.zip"
    _figures(tmp_path / "figs")
    _zip(good, tmp_path / "figs")
    good.write_bytes(good.read_bytes()[:-30])  # central directory cut short
    with pytest.raises(DataError):
        fetching.extract_archive(good, tmp_path / "y")


# ------------------------------------------------------------------------------------------ hub errors
def test_hub_offline_says_what_to_do_in_one_line(tmp_path: Path) -> None:
    assert constants.HF_HUB_OFFLINE  # tests/conftest.py sets HF_HUB_OFFLINE=1
    with pytest.raises(DataError) as info:
        prepare.fetch(PrepareConfig(source="hub"), tmp_path / "raw")
    message = str(info.value)
    assert "HF_HUB_OFFLINE" in message and "--source sample" in message and "--source local" in message
    assert "\n" not in message
    assert not (tmp_path / "raw" / "manifest.json").exists()


@pytest.mark.parametrize(
    ("error", "expected", "transient"),
    [
        (LocalEntryNotFoundError("connection refused"), "cannot reach the Hub", True),
        (httpx.ConnectError("name resolution failed"), "name resolution failed", True),
        (
            RepositoryNotFoundError(
                "404", response=httpx.Response(404, request=httpx.Request("GET", "https://huggingface.co"))
            ),
            "no such dataset or no access",
            False,
        ),
    ],
)
def test_hub_failures_are_classified(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: Exception, expected: str, transient: bool
) -> None:
    def failing(*args, **kwargs):
        raise error

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", failing)
    with pytest.raises((DataError, TransientError)) as info:
        fetching.hub_download("THU-KEG/MM_Math", COMMIT, tmp_path)
    assert expected in str(info.value) and "\n" not in str(info.value)
    assert is_transient(info.value) is transient


# ------------------------------------------------------------------------------------ local + keys
def test_local_path_checks(tmp_path: Path) -> None:
    jsonl = write_jsonl(tmp_path / "MM_Math.jsonl", [good_row(1)])
    (tmp_path / "notes.txt").write_text("x")
    cases = [
        (None, None, "needs --jsonl"),
        (tmp_path / "missing.jsonl", tmp_path, "--jsonl .*missing.jsonl does not exist"),
        (jsonl, None, "needs --images"),
        (jsonl, tmp_path / "nope", "--images .*nope does not exist"),
        (jsonl, tmp_path / "notes.txt", "neither a folder nor a .zip/.tar"),
    ]
    for records, images, message in cases:
        with pytest.raises(DataError, match=message):
            fetching.check_local_paths(str(records) if records else None, str(images) if images else None)


def test_fetch_keys_follow_their_inputs(tmp_path: Path) -> None:
    assert fetching.sample_fingerprint() == fetching.sample_fingerprint()
    jsonl = write_jsonl(tmp_path / "MM_Math.jsonl", [good_row(1)])
    _figures(tmp_path / "images")
    cfg = PrepareConfig(source="local", jsonl=str(jsonl), images=str(tmp_path / "images"))
    first = prepare.fetch_fingerprint(cfg)
    assert prepare.fetch_fingerprint(cfg) == first
    figure = tmp_path / "images" / "0.png"
    os.utime(figure, ns=(figure.stat().st_atime_ns, figure.stat().st_mtime_ns + 10**9))  # a figure was replaced
    assert prepare.fetch_fingerprint(cfg) != first
    hub = PrepareConfig(source="hub", hub_revision=COMMIT)
    other = hub.model_copy(update={"hub_revision": "b" * 40})
    assert prepare.fetch_fingerprint(hub) != prepare.fetch_fingerprint(other)
    # Settings that do not change the output never change a key.
    assert prepare.expected_fingerprint(PrepareConfig(workers=1)) == prepare.expected_fingerprint(
        PrepareConfig(workers=2)
    )


def test_a_pinned_hub_revision_prepared_earlier_is_reused_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = _build_layout("jsonl+zip", tmp_path / "repo")

    def fake_snapshot_download(repo_id: str, **kwargs) -> str:
        shutil.copytree(repo, kwargs["local_dir"], dirs_exist_ok=True)
        return str(kwargs["local_dir"])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    cfg = PrepareConfig(source="hub", hub_revision=COMMIT, workers=1)
    first = prepare.run(cfg, tmp_path / "out")
    report = prepare.Report.of(first)
    assert (report.kept, report.resolved_revision) == (N, COMMIT)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("downloaded again"))
    assert prepare.run(cfg, tmp_path / "out") == first  # the folder already holds this output: no network needed
    with pytest.raises(DataError, match="HF_HUB_OFFLINE is set") as info:
        prepare.run(cfg, tmp_path / "elsewhere")  # another folder must download: one line saying so
    assert "\n" not in str(info.value) and not (tmp_path / "elsewhere" / "manifest.json").exists()
