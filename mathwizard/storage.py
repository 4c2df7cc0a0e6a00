"""Stage folders on any fsspec URL: stages work on local paths, this module moves finished folders in and out.

With the artifact root on shared storage (`s3://bucket/prefix`), a stage on one machine pushes its folder there and
a stage on another pulls it, so work hands over between a CPU worker and a GPU worker. Local paths pass through
untouched. Pulled folders are cached locally under their manifest's fingerprint, so a folder is downloaded once
per content, not once per run. A pushed folder gets its `manifest.json` last: a reader that sees the manifest sees
every file (the same commit-marker rule as on a local disk).

Endpoints and credentials come from fsspec's configuration (e.g. `FSSPEC_S3_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`),
read at call time, or from `storage_options`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import fsspec
import fsspec.config
from fsspec import AbstractFileSystem

from mathwizard.errors import DataError, TransientError
from mathwizard.manifest import MANIFEST_NAME, MIRROR_MARK, Manifest, read_manifest, stable_hash

log = logging.getLogger(__name__)

# Resume state, not output: a downstream stage never needs it, so `pull` leaves it behind.
RESUME_STATE = ("checkpoints", "chunks")
_LOCAL_PROTOCOLS = ("file", "local")


def is_remote(location: str | Path) -> bool:
    """True for URLs other than file:// (s3://, gs://, memory://, ...); plain paths are local."""
    text = str(location)
    if "://" not in text:
        return False
    return text.split("://", 1)[0] not in _LOCAL_PROTOCOLS


def local_path(location: str | Path) -> Path:
    """A local location as a Path (file:// stripped)."""
    text = str(location)
    return Path(text.split("://", 1)[1]) if text.startswith("file://") else Path(text)


def join(base: str | Path, *parts: str) -> str:
    """`base/part/...` for URLs and paths alike (no os.sep on URLs)."""
    text = str(base).rstrip("/")
    return "/".join([text, *(p.strip("/") for p in parts if p)])


def filesystem(url: str, storage_options: Mapping[str, Any] | None = None) -> tuple[AbstractFileSystem, str]:
    """The filesystem and the bare path of `url`; FSSPEC_* variables are re-read so a late endpoint counts."""
    fsspec.config.set_conf_env(fsspec.config.conf)
    fs, path = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
    return fs, path.rstrip("/")


def _list_files(fs: AbstractFileSystem, root: str) -> dict[str, int]:
    """Relative path -> size of every file under `root` (empty when it does not exist)."""
    fs.invalidate_cache(root)  # another machine may have written since we last looked
    try:
        found = fs.find(root, detail=True)
    except FileNotFoundError:
        return {}
    files: dict[str, int] = {}
    for path, info in found.items():
        if info.get("type") == "directory":
            continue
        rel = PurePosixPath(path).relative_to(PurePosixPath(root)).as_posix()
        files[rel] = int(info.get("size") or 0)
    return files


def _excluded(rel: str, exclude: Iterable[str]) -> bool:
    head, name = rel.split("/", 1)[0], PurePosixPath(rel).name
    return head in exclude or head.startswith(".tmp") or name.endswith(".tmp") or name == MIRROR_MARK


def _storage_error(action: str, url: str, exc: Exception) -> Exception:
    if isinstance(exc, FileNotFoundError | PermissionError):
        return DataError(f"cannot {action} {url}: {exc}; check the URL and the storage credentials")
    return TransientError(f"cannot {action} {url}: {type(exc).__name__}: {exc}")


# ------------------------------------------------------------------------------------------ manifests
def remote_manifest(url: str | Path, storage_options: Mapping[str, Any] | None = None) -> Manifest | None:
    """The manifest of the stage folder at `url` (local or remote), or None when it is absent or unreadable."""
    if not is_remote(url):
        return read_manifest(local_path(url))
    fs, root = filesystem(str(url), storage_options)
    path = f"{root}/{MANIFEST_NAME}"
    fs.invalidate_cache(root)
    try:
        text = fs.cat_file(path).decode("utf-8")
    except FileNotFoundError:
        return None
    except Exception as exc:
        raise _storage_error("read", f"{url}/{MANIFEST_NAME}", exc) from exc
    try:
        return Manifest.model_validate_json(text)
    except ValueError as exc:
        log.warning("ignoring unreadable manifest %s/%s: %s", url, MANIFEST_NAME, exc)
        return None


def find_stage_folders(url: str | Path, storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """Relative paths of the finished stage folders under `url` (a run folder): the outermost holding a manifest."""
    if not is_remote(url):
        root = local_path(url)
        return _outermost(p.parent.relative_to(root).as_posix() for p in root.glob(f"**/{MANIFEST_NAME}"))
    fs, root = filesystem(str(url), storage_options)
    names = [rel for rel in _list_files(fs, root) if PurePosixPath(rel).name == MANIFEST_NAME]
    return _outermost(PurePosixPath(rel).parent.as_posix() for rel in names)


# ------------------------------------------------------------------------------------------ transfers
def pull(
    url: str | Path,
    scratch: str | Path,
    *,
    dest: str | Path | None = None,
    exclude: Iterable[str] = RESUME_STATE,
    storage_options: Mapping[str, Any] | None = None,
) -> Path:
    """A local copy of the finished stage folder at `url`; local paths are returned as they are.

    Resume state (`exclude`) and sub-folders with their own manifest (a sub-step's output, such as prepare's raw
    download) stay behind: downstream stages read only the stage's own output.
    The copy lands in `scratch/pulled/<stage>-<fingerprint>` (or `dest`, whose earlier content it replaces) and is
    reused while its manifest carries the remote fingerprint, so an unchanged folder is downloaded once. Files are
    fetched into a temporary folder and renamed into place, and checked against the sizes the manifest records.

    Raises:
        DataError: `url` holds no manifest (the upstream stage has not finished there).
        TransientError: the storage failed mid-way (safe to retry).
    """
    if not is_remote(url):
        return local_path(url)
    manifest = remote_manifest(url, storage_options)
    if manifest is None:
        raise DataError(
            f"{url} has no {MANIFEST_NAME}: it is not a finished stage folder; run the stage that writes it first"
        )
    name = f"{manifest.stage}-{manifest.fingerprint[:16]}"
    target = Path(dest) if dest is not None else Path(scratch) / "pulled" / name
    cached = read_manifest(target)
    if cached is not None and cached.fingerprint == manifest.fingerprint and not (target / MIRROR_MARK).exists():
        log.info("%s already pulled to %s", url, target)
        return target

    fs, root = filesystem(str(url), storage_options)
    exclude = tuple(exclude)
    listing = _list_files(fs, root)
    nested = _nested_stage_folders(listing)

    def wanted(rel: str) -> bool:
        return not _excluded(rel, exclude) and not any(rel.startswith(f"{folder}/") for folder in nested)

    files = {rel: size for rel, size in listing.items() if wanted(rel)}
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        rels = [rel for rel in files if rel != MANIFEST_NAME]
        for rel in rels:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        if rels:
            fs.get([f"{root}/{rel}" for rel in rels], [str(tmp / rel) for rel in rels])
        _check_sizes(tmp, manifest, url, wanted)
        (tmp / MANIFEST_NAME).write_text(manifest.model_dump_json(indent=2) + "\n", encoding="utf-8")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except (DataError, TransientError):
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _storage_error("download", str(url), exc) from exc
    log.info("pulled %s (%d files) to %s", url, len(files), target)
    return target


def _nested_stage_folders(listing: Iterable[str]) -> list[str]:
    """Sub-folders holding their own manifest: a sub-step's output (prepare's raw/ and clean/), internal state."""
    return [
        PurePosixPath(rel).parent.as_posix()
        for rel in listing
        if PurePosixPath(rel).name == MANIFEST_NAME and rel != MANIFEST_NAME
    ]


def _outermost(folders: Iterable[str]) -> list[str]:
    chosen: list[str] = []
    for folder in sorted(folders, key=lambda f: (f.count("/"), f)):
        if not any(folder == c or folder.startswith(f"{c}/") or c == "." for c in chosen):
            chosen.append(folder)
    return sorted(chosen)


def _check_sizes(folder: Path, manifest: Manifest, url: str | Path, wanted: Callable[[str], bool]) -> None:
    for rel, info in manifest.files.items():
        if not wanted(rel):
            continue
        path = folder / rel
        if not path.is_file() or path.stat().st_size != info.bytes:
            raise TransientError(f"{url}/{rel} is missing or not {info.bytes} bytes; the folder changed while pulled")


def push(
    local_dir: str | Path,
    url: str | Path,
    *,
    delete: bool = True,
    storage_options: Mapping[str, Any] | None = None,
) -> int:
    """Upload `local_dir` to `url` as an exact mirror, its manifest last; returns the number of files sent.

    The remote manifest is removed first, so a reader never takes a half-updated folder for a finished one.
    Files already there with the same size and a newer timestamp are not sent again (checkpoints, caches).
    With `delete`, remote files that no longer exist locally are removed (rotated checkpoints, old outputs).
    A local `url` is a copy target (or nothing to do when it is the same folder).
    """
    source = Path(local_dir)
    if not is_remote(url):
        target = local_path(url)
        if target.resolve() != source.resolve():
            shutil.copytree(source, target, dirs_exist_ok=True)
        return 0
    fs, root = filesystem(str(url), storage_options)
    local_files = {
        p.relative_to(source).as_posix(): p
        for p in sorted(source.rglob("*"))
        if p.is_file() and not _excluded(p.relative_to(source).as_posix(), ())
    }
    try:
        remote = _remote_details(fs, root)
        if MANIFEST_NAME in remote:
            fs.rm_file(f"{root}/{MANIFEST_NAME}")
        send = [rel for rel, path in local_files.items() if rel != MANIFEST_NAME and not _same(path, remote.get(rel))]
        for rel in send:
            fs.makedirs(str(PurePosixPath(f"{root}/{rel}").parent), exist_ok=True)
        if send:
            fs.put([str(local_files[rel]) for rel in send], [f"{root}/{rel}" for rel in send])
        if delete:
            stale = [f"{root}/{rel}" for rel in remote if rel not in local_files and rel != MANIFEST_NAME]
            if stale:
                fs.rm(stale)
        if MANIFEST_NAME in local_files:
            fs.put_file(str(local_files[MANIFEST_NAME]), f"{root}/{MANIFEST_NAME}")
            send.append(MANIFEST_NAME)
    except Exception as exc:
        raise _storage_error("upload to", str(url), exc) from exc
    fs.invalidate_cache(root)
    log.info("pushed %s to %s (%d of %d files sent)", source, url, len(send), len(local_files))
    return len(send)


def _remote_details(fs: AbstractFileSystem, root: str) -> dict[str, dict[str, Any]]:
    fs.invalidate_cache(root)
    try:
        found = fs.find(root, detail=True)
    except FileNotFoundError:
        return {}
    return {
        PurePosixPath(path).relative_to(PurePosixPath(root)).as_posix(): info
        for path, info in found.items()
        if info.get("type") != "directory"
    }


def _same(path: Path, info: dict[str, Any] | None, newer_wins: str = "remote") -> bool:
    """Whether the remote file holds the local file's content: same size and, where S3 gives one, the same MD5.

    Multipart uploads (large files) have no plain MD5; then the copy counts as current when it is not older than the
    other side (`newer_wins="remote"`: the remote was written after the last local change; "local": the reverse),
    compared in whole seconds of the remote clock.
    """
    if info is None or int(info.get("size") or -1) != path.stat().st_size:
        return False
    etag = str(info.get("ETag") or info.get("etag") or "").strip('"')
    if len(etag) == 32 and "-" not in etag:  # a single-part upload's ETag is the MD5 of its bytes
        return etag == _md5(path)
    modified = info.get("LastModified") or info.get("mtime") or info.get("updated")
    timestamp = getattr(modified, "timestamp", None)
    remote = timestamp() if callable(timestamp) else modified
    if not isinstance(remote, int | float):
        return False
    local = int(path.stat().st_mtime)
    return remote >= local if newer_wins == "remote" else local >= int(remote)


def _md5(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def sync_down(
    url: str | Path,
    local_dir: str | Path,
    *,
    only: Iterable[str] | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> int:
    """Download the files under `url` whose content differs from the local copy (resume state, caches).

    Unlike `pull` this works on unfinished folders and never deletes local files. Content is compared by size and
    MD5 where the store gives one (a SQLite file keeps its size while its pages change). `only` limits it to those
    relative paths. Returns the number of files fetched.
    """
    if not is_remote(url):
        return 0
    fs, root = filesystem(str(url), storage_options)
    target = Path(local_dir)
    wanted = None if only is None else set(only)
    try:
        remote = _remote_details(fs, root)
        fetch = [
            rel
            for rel, info in remote.items()
            if (wanted is None or rel in wanted)
            and not _excluded(rel, ())
            and not ((target / rel).is_file() and _same(target / rel, info, newer_wins="local"))
        ]
        for rel in fetch:
            (target / rel).parent.mkdir(parents=True, exist_ok=True)
        if fetch:
            fs.get([f"{root}/{rel}" for rel in fetch], [str(target / rel) for rel in fetch])
    except Exception as exc:
        raise _storage_error("download", str(url), exc) from exc
    return len(fetch)


def scratch_dir(configured: str | None = None) -> Path:
    """Where remote folders are cached on this machine: the setting, else a folder under the temp dir."""
    path = Path(configured) if configured else Path(tempfile.gettempdir()) / "mathwizard-scratch"
    path.mkdir(parents=True, exist_ok=True)
    return path


def work_dir(url: str | Path, scratch: str | Path) -> Path:
    """The local folder in which a stage writes the output destined for `url` (stable per URL)."""
    text = str(url).rstrip("/")
    name = PurePosixPath(text).name or "out"
    return Path(scratch) / "work" / f"{name}-{stable_hash(text)[:12]}"
