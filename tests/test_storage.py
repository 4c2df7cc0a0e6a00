"""storage.py against a real S3 protocol (moto's server on 127.0.0.1): pull, push, manifests, local pass-through."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import s3fs

from mathwizard import storage
from mathwizard.errors import DataError
from mathwizard.manifest import MANIFEST_NAME, read_manifest, stage_output


def make_stage(folder: Path, fp: str = "f" * 64, *, payload: bytes = b"rows\n") -> None:
    """A finished stage folder: two output files, one checkpoint (resume state), the manifest last."""
    with stage_output(folder, stage="teach", version=1, fingerprint=fp) as record:
        (folder / "train.parquet").write_bytes(payload)
        (folder / "sub").mkdir(exist_ok=True)
        (folder / "sub" / "report.json").write_text("{}")
        (folder / "checkpoints" / "checkpoint-1").mkdir(parents=True, exist_ok=True)
        (folder / "checkpoints" / "checkpoint-1" / "state.bin").write_bytes(b"x" * 10)
        record.add_file("train.parquet", rows=1)
        record.add_file("sub/report.json")


def remote_files(url: str) -> list[str]:
    fs, root = storage.filesystem(url)
    fs.invalidate_cache()
    return sorted(p[len(root) + 1 :] for p in fs.find(root))


def test_locations_are_classified_and_joined() -> None:
    assert storage.is_remote("s3://b/p") and storage.is_remote("memory://x")
    assert not storage.is_remote("/tmp/x") and not storage.is_remote("file:///tmp/x") and not storage.is_remote("rel")
    assert storage.local_path("file:///tmp/x") == Path("/tmp/x")
    assert storage.join("s3://b/p/", "runs", "/01-prepare") == "s3://b/p/runs/01-prepare"


def test_local_paths_pass_through(tmp_path: Path) -> None:
    make_stage(tmp_path / "a")
    assert storage.pull(str(tmp_path / "a"), tmp_path / "scratch") == tmp_path / "a"
    assert not (tmp_path / "scratch").exists()
    assert storage.remote_manifest(tmp_path / "a").fingerprint == "f" * 64
    assert storage.push(tmp_path / "a", tmp_path / "a") == 0  # same folder: nothing to do


def test_push_then_pull_round_trip(tmp_path: Path, bucket: str) -> None:
    make_stage(tmp_path / "src")
    url = f"{bucket}/runs/r/02-teach"
    assert storage.remote_manifest(url) is None

    sent = storage.push(tmp_path / "src", url)
    # train.parquet + sub/report.json + checkpoints/checkpoint-1/state.bin + manifest.json = 4
    assert sent == 4
    assert remote_files(url) == [
        "checkpoints/checkpoint-1/state.bin",
        MANIFEST_NAME,
        "sub/report.json",
        "train.parquet",
    ]
    assert storage.remote_manifest(url).fingerprint == "f" * 64

    local = storage.pull(url, tmp_path / "scratch")
    assert local == tmp_path / "scratch" / "pulled" / f"teach-{'f' * 16}"
    assert (local / "train.parquet").read_bytes() == b"rows\n"
    assert (local / "sub" / "report.json").read_text() == "{}"
    assert not (local / "checkpoints").exists()  # resume state stays behind
    assert read_manifest(local).fingerprint == "f" * 64


def test_pull_reuses_the_copy_with_the_same_fingerprint(tmp_path: Path, bucket: str) -> None:
    make_stage(tmp_path / "src")
    url = f"{bucket}/02-teach"
    storage.push(tmp_path / "src", url)
    first = storage.pull(url, tmp_path / "scratch")
    (first / "marker").write_text("kept")  # a re-download would replace the folder and drop this file
    assert storage.pull(url, tmp_path / "scratch") == first
    assert (first / "marker").exists()

    # New content under a new fingerprint lands in a new folder.
    make_stage(tmp_path / "src", fp="e" * 64, payload=b"more rows\n")
    storage.push(tmp_path / "src", url)
    second = storage.pull(url, tmp_path / "scratch")
    assert second.name == f"teach-{'e' * 16}"
    assert (second / "train.parquet").read_bytes() == b"more rows\n"


def test_pull_refuses_an_unfinished_folder(tmp_path: Path, bucket: str) -> None:
    fs, root = storage.filesystem(f"{bucket}/half")
    fs.pipe_file(f"{root}/train.parquet", b"partial")
    with pytest.raises(DataError, match=r"no manifest\.json"):
        storage.pull(f"{bucket}/half", tmp_path / "scratch")
    assert not (tmp_path / "scratch" / "pulled").exists() or not any((tmp_path / "scratch" / "pulled").iterdir())


def test_push_mirrors_and_writes_the_manifest_last(tmp_path: Path, bucket: str, monkeypatch) -> None:
    make_stage(tmp_path / "src")
    url = f"{bucket}/03-sft"
    storage.push(tmp_path / "src", url)

    # Rotate a checkpoint and change one output; record the order of uploads.
    (tmp_path / "src" / "checkpoints" / "checkpoint-1" / "state.bin").unlink()
    (tmp_path / "src" / "checkpoints" / "checkpoint-2").mkdir()
    (tmp_path / "src" / "checkpoints" / "checkpoint-2" / "state.bin").write_bytes(b"y" * 10)
    time.sleep(0.01)
    (tmp_path / "src" / "train.parquet").write_bytes(b"changed rows\n")
    events: list[str] = []
    put_file, rm_file = s3fs.S3FileSystem._put_file, s3fs.S3FileSystem._rm_file

    async def spy_put_file(self, lpath, rpath, *args, **kwargs):
        events.append(f"put {Path(lpath).name}")
        return await put_file(self, lpath, rpath, *args, **kwargs)

    async def spy_rm_file(self, path, *args, **kwargs):
        events.append(f"rm {Path(path).name}")
        return await rm_file(self, path, *args, **kwargs)

    # s3fs builds its sync methods per instance from these coroutines, so patch them before the instance exists.
    s3fs.S3FileSystem.clear_instance_cache()
    monkeypatch.setattr(s3fs.S3FileSystem, "_put_file", spy_put_file)
    monkeypatch.setattr(s3fs.S3FileSystem, "_rm_file", spy_rm_file)
    sent = storage.push(tmp_path / "src", url)

    # The old manifest goes first; only what changed travels (new checkpoint, rewritten parquet); manifest last.
    assert events[0] == f"rm {MANIFEST_NAME}"
    assert sorted(events[1:3]) == ["put state.bin", "put train.parquet"]
    assert events[-1] == f"put {MANIFEST_NAME}"
    assert sent == 3  # state.bin + train.parquet + manifest.json
    assert remote_files(url) == [
        "checkpoints/checkpoint-2/state.bin",
        MANIFEST_NAME,
        "sub/report.json",
        "train.parquet",
    ]


def test_sync_down_fetches_only_missing_files(tmp_path: Path, bucket: str) -> None:
    fs, root = storage.filesystem(f"{bucket}/cache")
    fs.pipe_file(f"{root}/teacher/a.jsonl", b"1\n")
    fs.pipe_file(f"{root}/teacher/b.jsonl", b"22\n")
    local = tmp_path / "cache"
    (local / "teacher").mkdir(parents=True)
    (local / "teacher" / "a.jsonl").write_bytes(b"1\n")
    (local / "teacher" / "own.jsonl").write_bytes(b"mine\n")
    # a.jsonl is present with the same size, so only b.jsonl is fetched; local-only files are kept.
    assert storage.sync_down(f"{bucket}/cache", local) == 1
    assert sorted(p.name for p in (local / "teacher").iterdir()) == ["a.jsonl", "b.jsonl", "own.jsonl"]
    assert storage.sync_down(f"{bucket}/missing", tmp_path / "empty") == 0


def test_find_stage_folders_lists_finished_folders(tmp_path: Path, bucket: str) -> None:
    make_stage(tmp_path / "run" / "02-teach")
    make_stage(tmp_path / "run" / "06-eval" / "sft")
    (tmp_path / "run" / "03-sft").mkdir()  # unfinished: no manifest
    assert storage.find_stage_folders(tmp_path / "run") == ["02-teach", "06-eval/sft"]
    storage.push(tmp_path / "run", f"{bucket}/run")
    assert storage.find_stage_folders(f"{bucket}/run") == ["02-teach", "06-eval/sft"]


def test_work_dir_is_stable_per_url(tmp_path: Path) -> None:
    a = storage.work_dir("s3://b/runs/x/03-sft", tmp_path)
    assert a == storage.work_dir("s3://b/runs/x/03-sft/", tmp_path)
    assert a.name.startswith("03-sft-") and a != storage.work_dir("s3://b/runs/y/03-sft", tmp_path)


def test_sync_down_fetches_a_changed_file_of_the_same_size(tmp_path: Path, bucket: str) -> None:
    # SQLite caches keep their size (whole pages) while their content changes.
    fs, root = storage.filesystem(f"{bucket}/cache")
    fs.pipe_file(f"{root}/teacher.sqlite", b"page-B")
    local = tmp_path / "cache"
    local.mkdir()
    (local / "teacher.sqlite").write_bytes(b"page-A")
    assert storage.sync_down(f"{bucket}/cache", local) == 1
    assert (local / "teacher.sqlite").read_bytes() == b"page-B"
    assert storage.sync_down(f"{bucket}/cache", local) == 0  # now identical


def test_pull_leaves_sub_step_folders_behind(tmp_path: Path, bucket: str) -> None:
    # prepare keeps its raw download and cleaned rows in sub-folders with their own manifests: internal state.
    make_stage(tmp_path / "run" / "01-prepare")
    make_stage(tmp_path / "run" / "01-prepare" / "raw", fp="a" * 64)
    storage.push(tmp_path / "run", f"{bucket}/run")
    assert storage.find_stage_folders(f"{bucket}/run") == ["01-prepare"]
    assert storage.find_stage_folders(tmp_path / "run") == ["01-prepare"]
    local = storage.pull(f"{bucket}/run/01-prepare", tmp_path / "scratch")
    assert sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()) == [
        "manifest.json",
        "sub/report.json",
        "train.parquet",
    ]
