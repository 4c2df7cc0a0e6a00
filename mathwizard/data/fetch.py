"""Fetch MM_Math from the Hub, local files or the bundled sample, and find its records file and image folder.

MM_Math's layout changed between revisions (`MM_Math.jsonl` + `MM_Math.zip` or `Image.zip`; earlier
`MM_Math.json` + `image.tar`), so the layout is detected, never assumed. Archives are extracted member by
member: only regular files and folders, never links, never a path that leaves the destination.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import stat
import tarfile
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from mathwizard.errors import DataError, TransientError

log = logging.getLogger(__name__)

SAMPLE_DIR = Path(__file__).parent / "sample"
SAMPLE_JSONL = SAMPLE_DIR / "mm_math_sample.jsonl"
SAMPLE_IMAGES = SAMPLE_DIR / "images"
RECORD_SUFFIXES = (".jsonl", ".json")
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff")
_IGNORED_DIRS = {"__MACOSX", ".cache", ".git", ".huggingface"}
OFFLINE_HINT = (
    "use --source sample (the bundled sample) or --source local --jsonl FILE --images DIR_OR_ARCHIVE "
    "with a copy of MM_Math"
)


@dataclass(frozen=True)
class Layout:
    """Where a MM_Math copy keeps its rows and figures."""

    records: Path
    images: Path  # a folder or an archive

    @property
    def images_kind(self) -> str:
        return "folder" if self.images.is_dir() else "archive"


# ------------------------------------------------------------------------------------ layout detection
def is_archive(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(ARCHIVE_SUFFIXES)


def _visible_files(folder: Path) -> Iterable[Path]:
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if d not in _IGNORED_DIRS and not d.startswith("."))
        for name in sorted(files):
            if not name.startswith("."):
                yield Path(root) / name


def _rank(path: Path, preferred: tuple[str, ...]) -> tuple[int, int, str]:
    """Lower is better: names mentioning MM_Math or images first, then shallow paths."""
    name = path.name.lower()
    hits = sum(word in name for word in preferred)
    return (-hits, len(path.parts), name)


def detect_layout(folder: Path) -> Layout:
    """Find the records file (jsonl, or a json list) and the images (folder or archive) in a MM_Math copy.

    Raises:
        DataError: no records file or no images, naming the folder and what was looked for.
    """
    folder = Path(folder)
    files = list(_visible_files(folder))
    records = [p for p in files if p.suffix.lower() in RECORD_SUFFIXES and "solution" not in p.name.lower()]
    if not records:
        raise DataError(f"{folder} holds no .jsonl or .json records file; is it a copy of MM_Math?")
    # jsonl is the current format; prefer it over an older json list lying beside it.
    records.sort(key=lambda p: (p.suffix.lower() != ".jsonl", *_rank(p, ("mm_math", "mmmath"))))
    archives = [p for p in files if is_archive(p) and "solution" not in p.name.lower()]
    image_dirs = sorted(
        {p.parent for p in files if p.suffix.lower() in IMAGE_SUFFIXES and "solution" not in str(p.parent).lower()},
        key=lambda p: len(p.parts),
    )
    if image_dirs:
        images = image_dirs[0]
    elif archives:
        images = sorted(archives, key=lambda p: _rank(p, ("image", "mm_math", "img")))[0]
    else:
        raise DataError(f"{folder} holds no image folder and no .zip/.tar archive of images")
    log.info("MM_Math layout in %s: records %s, images %s", folder, records[0].name, images.name)
    return Layout(records=records[0], images=images)


# ----------------------------------------------------------------------------------- safe extraction
def _safe_member(name: str) -> PurePosixPath | None:
    """The member's relative path, or None when it is absolute or climbs out with '..'."""
    name = name.replace("\\", "/")
    path = PurePosixPath(name)
    if not name or path.is_absolute() or (len(name) > 1 and name[1] == ":") or ".." in path.parts:
        return None
    parts = [p for p in path.parts if p not in ("", ".")]
    return PurePosixPath(*parts) if parts else None


def extract_archive(archive: Path, dest: Path) -> int:
    """Extract regular files of a zip or tar into `dest`; returns how many members were skipped as unsafe.

    Links, devices, absolute paths and `..` members are skipped (logged), so nothing lands outside `dest`
    and no extracted name can point elsewhere. Raises DataError for an archive that cannot be read.
    """
    dest.mkdir(parents=True, exist_ok=True)
    skipped = 0
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                for info in zf.infolist():
                    rel = _safe_member(info.filename)
                    is_link = stat.S_ISLNK(info.external_attr >> 16)
                    if info.is_dir():
                        continue
                    if rel is None or is_link:
                        skipped += 1
                        log.warning("skipping unsafe archive member %r in %s", info.filename, archive.name)
                        continue
                    target = dest / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(info) as src, open(target, "wb") as dst:
                        shutil.copyfileobj(src, dst, 1 << 20)
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive) as tf:
                for member in tf:
                    if member.isdir():
                        continue
                    rel = _safe_member(member.name)
                    if rel is None or not member.isfile():
                        skipped += 1
                        log.warning("skipping unsafe archive member %r in %s", member.name, archive.name)
                        continue
                    source = tf.extractfile(member)
                    if source is None:
                        skipped += 1
                        continue
                    target = dest / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with source, open(target, "wb") as dst:
                        shutil.copyfileobj(source, dst, 1 << 20)
        else:
            raise DataError(f"{archive} is neither a zip nor a tar archive")
    except (zipfile.BadZipFile, tarfile.TarError, EOFError) as exc:
        raise DataError(f"cannot extract {archive}: {exc}; re-download it or pass an image folder") from None
    return skipped


def find_image_root(folder: Path, file_names: list[str]) -> Path:
    """The folder under `folder` (any nesting) where the rows' `file_name`s resolve best.

    Archives wrap the figures in folders whose names changed between revisions (`Image/`, `MM_Math/images/`),
    and some rows may carry a folder prefix; probing the names finds the root without guessing the name.
    """
    probe = [n for n in file_names[:200] if n and ".." not in n and not n.startswith("/")]
    nested = (Path(root) for root, _, _ in os.walk(folder) if Path(root) != folder)
    candidates = [folder, *sorted((p for p in nested if p.name not in _IGNORED_DIRS), key=lambda p: len(p.parts))]
    best, best_hits = folder, -1
    for candidate in candidates[:500]:
        hits = sum((candidate / name).is_file() for name in probe)
        if hits > best_hits:
            best, best_hits = candidate, hits
    return best


# ---------------------------------------------------------------------------------------- fingerprints
def _stat_key(path: Path) -> list[object]:
    st = path.stat()
    return [str(path.resolve()), st.st_size, st.st_mtime_ns]


def files_fingerprint(*paths: Path) -> str:
    """Cheap identity of local inputs: path, size and modification time of every file (folders walked)."""
    h = hashlib.sha256()
    for path in paths:
        if path.is_dir():
            for file in _visible_files(path):
                h.update(repr(_stat_key(file)).encode())
        else:
            h.update(repr(_stat_key(path)).encode())
    return h.hexdigest()


def sample_fingerprint() -> str:
    """Content hash of the bundled sample: editing or regenerating it changes the key."""
    h = hashlib.sha256()
    for file in [SAMPLE_JSONL, *sorted(SAMPLE_IMAGES.glob("*"))]:
        h.update(file.name.encode())
        h.update(hashlib.sha256(file.read_bytes()).digest())
    return h.hexdigest()


def hub_revision(repo: str, revision: str | None) -> str:
    """The commit to download: the pinned revision, or the current head when online (so growth is seen).

    Offline, the unresolved name is returned; the download itself then fails with a clear message.
    """
    if revision is not None and len(revision) == 40:
        return revision
    import httpx
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    try:
        return HfApi().dataset_info(repo, revision=revision).sha or (revision or "main")
    except (HfHubHTTPError, httpx.HTTPError, OSError, ValueError) as exc:
        log.debug("cannot resolve %s@%s: %s", repo, revision, exc)
        return revision or "main"


# --------------------------------------------------------------------------------------------- sources
def hub_download(repo: str, revision: str | None, dest: Path) -> Path:
    """Download the dataset repo into `dest` as plain files (no cache symlinks, which the cleaner rejects).

    Raises:
        DataError: offline mode, unknown repo or revision (permanent; the message says what to use instead).
        TransientError: the Hub cannot be reached or answers with a server error (worth retrying).
    """
    import httpx
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{repo}@{revision or 'main'}"
    if constants.HF_HUB_OFFLINE:
        raise DataError(f"cannot download {where}: HF_HUB_OFFLINE is set; unset it, or {OFFLINE_HINT}")
    try:
        path = snapshot_download(repo_id=repo, repo_type="dataset", revision=revision, local_dir=dest)
    except (RepositoryNotFoundError, GatedRepoError) as exc:
        raise DataError(f"cannot download {where}: no such dataset or no access ({type(exc).__name__})") from None
    except HFValidationError as exc:
        raise DataError(f"cannot download {where}: {str(exc).splitlines()[0][:160]}; fix prepare.hub_repo") from None
    except RevisionNotFoundError:
        raise DataError(f"cannot download {where}: no such revision; fix prepare.hub_revision") from None
    except LocalEntryNotFoundError:
        # What snapshot_download raises when the Hub cannot be reached: maybe a blip, so worth a retry.
        raise TransientError(f"cannot reach the Hub to download {where} (no network?); {OFFLINE_HINT}") from None
    except (OfflineModeIsEnabled, EntryNotFoundError) as exc:
        raise DataError(f"cannot download {where}: {type(exc).__name__}; {OFFLINE_HINT}") from None
    except (HfHubHTTPError, httpx.HTTPError, OSError) as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise TransientError(f"cannot download {where}: {first}; {OFFLINE_HINT}") from None
    return Path(path)


def check_local_paths(jsonl: str | None, images: str | None) -> tuple[Path, Path | None]:
    """Validate --jsonl/--images for source=local; a folder given as --jsonl is a whole MM_Math copy.

    Raises:
        DataError: missing option or path, in one line naming the flag.
    """
    if not jsonl:
        raise DataError("source=local needs --jsonl FILE (MM_Math jsonl/json, or a folder holding MM_Math)")
    records = Path(jsonl).expanduser()
    if not records.exists():
        raise DataError(f"--jsonl {records} does not exist")
    if images is None:
        if records.is_dir():
            return records, None
        raise DataError("source=local needs --images DIR_OR_ARCHIVE (the figures' folder or its zip/tar)")
    image_path = Path(images).expanduser()
    if not image_path.exists():
        raise DataError(f"--images {image_path} does not exist")
    if not image_path.is_dir() and not image_path.name.lower().endswith(ARCHIVE_SUFFIXES):
        raise DataError(f"--images {image_path} is neither a folder nor a .zip/.tar archive")
    return records, image_path
