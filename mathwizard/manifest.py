"""Stage manifests: the commit marker of every stage folder, and the one place that decides whether a stage runs.

A stage writes its files into its output folder and `manifest.json` last (atomically). `reusable` answers "why did
this stage (not) run?": a folder is reused only when its manifest carries the fingerprint the stage expects (the same
settings and inputs) and every file it lists is still there with its recorded size; otherwise the stage runs and the
log says why. Nothing else (Prefect caches, the flows, the CLI) second-guesses it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, Field

from mathwizard import __version__

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
# Marks a local folder that mirrors a finished remote folder by its manifest alone (see remote.py): its files live on
# the remote side, so only the fingerprint is checked here.
MIRROR_MARK = ".mirror-only"
# Part of every fingerprint: bump when the manifest's own layout changes, so older folders are redone, not misread.
MANIFEST_FORMAT = 2
_ENV_PACKAGES = ("torch", "transformers", "trl", "peft", "datasets", "unsloth", "prefect")


class FileInfo(BaseModel):
    """One output file: its size, checksum and, for tables, its row count."""

    bytes: int
    sha256: str
    rows: int | None = None


class Manifest(BaseModel):
    """What a stage produced, from what, with which settings and software."""

    stage: str
    version: int
    fingerprint: str
    upstream: dict[str, str] = Field(default_factory=dict, description="Upstream stage name -> fingerprint.")
    config: dict[str, Any] = Field(default_factory=dict)
    files: dict[str, FileInfo] = Field(default_factory=dict)
    report: dict[str, Any] = Field(default_factory=dict, description="The stage's typed report (see StageReport).")
    mathwizard_version: str = __version__
    env: dict[str, str] = Field(default_factory=dict)
    created_at: str = ""
    seconds: float = Field(0.0, description="Wall time of the whole stage, loading and saving included.")


class StageReport(BaseModel):
    """Base of each stage's typed report: what it did, in numbers, built and read next to the stage.

    A stage module defines `class Report(StageReport)`, fills it while it runs and hands it to `StageRecord.report`;
    readers (flows, CLI, cards) call `Report.of(manifest)` instead of digging in untyped dicts.
    """

    model_config = ConfigDict(extra="forbid")

    @classmethod
    def of(cls, manifest: Manifest | dict[str, Any]) -> Self:
        """The report stored in `manifest` (a Manifest or its JSON dict, as flows return it)."""
        data = manifest.report if isinstance(manifest, Manifest) else manifest.get("report", {})
        return cls.model_validate(data)


def _canonical(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return _canonical(value.model_dump(mode="json"))
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def stable_hash(*parts: Any) -> str:
    """sha256 over a canonical JSON rendering of `parts` (dict order and tuples vs lists do not matter)."""
    blob = json.dumps([_canonical(p) for p in parts], sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def fingerprint(stage: str, version: int, config: Any, upstream: Mapping[str, str] | None = None, **inputs: Any) -> str:
    """The identity of a stage's output: stage, its version, the settings that matter, and its inputs."""
    return stable_hash(MANIFEST_FORMAT, stage, version, config, dict(upstream or {}), inputs)


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def describe_file(path: Path, rows: int | None = None) -> FileInfo:
    return FileInfo(bytes=path.stat().st_size, sha256=file_sha256(path), rows=rows)


def environment() -> dict[str, str]:
    """Versions that change results, pinned in every manifest (as TRL's invariant references do)."""
    env = {"python": platform.python_version(), "platform": sys.platform}
    for name in _ENV_PACKAGES:
        try:
            env[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    if "torch" in sys.modules:  # never import torch just to describe the environment
        torch = sys.modules["torch"]
        if torch.cuda.is_available():
            env["gpu"] = torch.cuda.get_device_name(0)
    return env


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temporary file and os.replace, so readers never see half a file, even after kill -9."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_manifest(folder: Path) -> Manifest | None:
    """The manifest of a finished stage folder, or None when there is none or it is unreadable."""
    path = Path(folder) / MANIFEST_NAME
    try:
        return Manifest.model_validate_json(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except ValueError as exc:
        log.warning("ignoring unreadable manifest %s: %s", path, exc)
        return None


def write_manifest(folder: Path, manifest: Manifest) -> Manifest:
    atomic_write_text(Path(folder) / MANIFEST_NAME, manifest.model_dump_json(indent=2) + "\n")
    return manifest


def damage(folder: Path, manifest: Manifest) -> str | None:
    """Why the files a manifest lists are not all there as written (missing, or another size); None when they are."""
    folder = Path(folder)
    if (folder / MIRROR_MARK).exists():
        return None  # the files are on the remote side; pulling checks them
    for relative, info in manifest.files.items():
        path = folder / relative
        if not path.is_file():
            return f"{relative} is missing"
        if path.stat().st_size != info.bytes:
            return f"{relative} is {path.stat().st_size:,} bytes, not the {info.bytes:,} recorded"
    return None


def reusable(folder: Path, expected_fingerprint: str) -> Manifest | None:
    """The folder's manifest when the stage can be skipped, else None; logs the reason either way.

    Skipped only when the manifest carries `expected_fingerprint` (made from exactly these settings and inputs) and
    every file it lists is present with its recorded size. This is the one place that decides.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is None:
        log.debug("%s has no finished output; running the stage", folder)
        return None
    if manifest.fingerprint != expected_fingerprint:
        log.info("%s was made from other settings or inputs; running the stage again", folder)
        return None
    if (problem := damage(folder, manifest)) is not None:
        log.warning("%s is damaged (%s); running the stage again", folder, problem)
        return None
    log.info("%s is up to date (fingerprint %s); skipping", folder, expected_fingerprint[:12])
    return manifest


class StageRecord:
    """Collects what a running stage produced; turned into its manifest when the stage finishes."""

    def __init__(self, folder: Path, manifest: Manifest) -> None:
        self.folder = folder
        self.manifest = manifest

    def add_file(self, relative: str, rows: int | None = None) -> None:
        self.manifest.files[relative] = describe_file(self.folder / relative, rows)

    def report(self, report: StageReport) -> None:
        """The stage's typed report, stored in the manifest."""
        self.manifest.report = report.model_dump(mode="json")


@contextmanager
def stage_output(
    folder: Path,
    *,
    stage: str,
    version: int,
    fingerprint: str,
    config: Any = None,
    upstream: Mapping[str, str] | None = None,
    started: float | None = None,
) -> Iterator[StageRecord]:
    """Run a stage's body against `folder`; the manifest is written last, only if the body succeeds.

    `started` (a `time.perf_counter()`) is when the stage began, when that was before this block (loading inputs),
    so `seconds` is the whole stage's wall time.

    An older manifest is removed first, so a crash mid-way never leaves a folder that looks finished.
    Files the body leaves in the folder (checkpoints, caches) stay there for the next attempt to resume from.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MANIFEST_NAME).unlink(missing_ok=True)
    started = time.perf_counter() if started is None else started
    manifest = Manifest(
        stage=stage,
        version=version,
        fingerprint=fingerprint,
        upstream=dict(upstream or {}),
        config=_canonical(config) if config is not None else {},
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    record = StageRecord(folder, manifest)
    yield record
    manifest.seconds = round(time.perf_counter() - started, 3)
    manifest.env = environment()
    write_manifest(folder, manifest)


def require_manifest(folder: Path, stage_hint: str) -> Manifest:
    """The upstream manifest of a finished, intact stage folder, or a DataError that says which command makes it."""
    from mathwizard.errors import DataError

    manifest = read_manifest(folder)
    if manifest is None:
        raise DataError(
            f"{folder} has no {MANIFEST_NAME}: it is not a finished stage folder; run `mathwizard {stage_hint}` first"
        )
    if (problem := damage(folder, manifest)) is not None:
        raise DataError(f"{folder} is damaged ({problem}); run `mathwizard {stage_hint}` again to redo it")
    return manifest
