"""Stage manifests: the commit marker of every stage folder, and the fingerprint that decides whether to skip it.

A stage writes its files into its output folder and `manifest.json` last (atomically), so a folder whose
manifest carries the expected fingerprint is complete and current; anything else is redone.
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
from typing import Any

from pydantic import BaseModel, Field

from mathwizard import __version__

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
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
    counts: dict[str, int] = Field(default_factory=dict)
    extra: dict[str, Any] = Field(default_factory=dict)
    mathwizard_version: str = __version__
    env: dict[str, str] = Field(default_factory=dict)
    created_at: str = ""
    seconds: float = 0.0


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
    return stable_hash(stage, version, config, dict(upstream or {}), inputs)


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


def reusable(folder: Path, expected_fingerprint: str) -> Manifest | None:
    """The folder's manifest if it was made from exactly these inputs and settings (skip the stage)."""
    manifest = read_manifest(folder)
    if manifest is not None and manifest.fingerprint == expected_fingerprint:
        log.info("%s is up to date (fingerprint %s); skipping", folder, expected_fingerprint[:12])
        return manifest
    return None


class StageRecord:
    """Collects what a running stage produced; turned into its manifest when the stage finishes."""

    def __init__(self, folder: Path, manifest: Manifest) -> None:
        self.folder = folder
        self.manifest = manifest

    def add_file(self, relative: str, rows: int | None = None) -> None:
        self.manifest.files[relative] = describe_file(self.folder / relative, rows)

    def count(self, **counts: int) -> None:
        self.manifest.counts.update(counts)


@contextmanager
def stage_output(
    folder: Path,
    *,
    stage: str,
    version: int,
    fingerprint: str,
    config: Any = None,
    upstream: Mapping[str, str] | None = None,
) -> Iterator[StageRecord]:
    """Run a stage's body against `folder`; the manifest is written last, only if the body succeeds.

    An older manifest is removed first, so a crash mid-way never leaves a folder that looks finished.
    Files the body leaves in the folder (checkpoints, caches) stay there for the next attempt to resume from.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MANIFEST_NAME).unlink(missing_ok=True)
    started = time.perf_counter()
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
    """The upstream manifest, or a DataError that says which command produces it."""
    from mathwizard.errors import DataError

    manifest = read_manifest(folder)
    if manifest is None:
        raise DataError(
            f"{folder} has no {MANIFEST_NAME}: it is not a finished stage folder; run `mathwizard {stage_hint}` first"
        )
    return manifest
