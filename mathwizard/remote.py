"""Run a stage against remote storage: pull its inputs, run it on local folders, push its output.

Stages only see local paths. When the artifact root or any location is a URL (`s3://...`), `run_on_storage`
gives the stage a local mirror of the artifact root (`<scratch>/home/<hash>`, same layout, so the stage's own
defaults such as the run's other stage folders and the shared cache resolve there), pulls each finished input into
it, runs the stage, and pushes the output back (manifest last). A remote output that is already finished is mirrored
by its manifest alone, so the stage's own skip check sees it and nothing is downloaded or uploaded. After a failure
the partial output (checkpoints, chunks) and the shared cache are pushed, so any machine can resume the work.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from mathwizard import storage
from mathwizard.config import Settings
from mathwizard.errors import DataError
from mathwizard.manifest import MANIFEST_NAME, read_manifest, stable_hash, write_manifest

log = logging.getLogger(__name__)

# Stages whose resume state lives in the shared cache folder (per-item teacher replies), synced around them.
CACHE_STAGES = frozenset({"teach"})


def is_remote_run(settings: Settings, *locations: str | None) -> bool:
    """True when the artifact root or any of the locations is on remote storage."""
    return any(storage.is_remote(loc) for loc in (settings.home, *locations) if loc)


class Mirror:
    """Maps locations under a remote artifact root to the same relative paths under a local folder."""

    def __init__(self, settings: Settings) -> None:
        self.remote_home = settings.home.rstrip("/")
        self.scratch = storage.scratch_dir(settings.orchestration.scratch)
        self.options = settings.orchestration.storage_options
        if storage.is_remote(self.remote_home):
            self.local_home = self.scratch / "home" / stable_hash(self.remote_home)[:12]
        else:
            self.local_home = storage.local_path(self.remote_home)

    def local(self, location: str) -> Path:
        """Where a remote location lives on this machine (outside the root: a folder named after its URL)."""
        text = location.rstrip("/")
        if text.startswith(self.remote_home + "/"):
            return self.local_home / text[len(self.remote_home) + 1 :]
        return storage.work_dir(text, self.scratch)

    def settings(self, settings: Settings) -> Settings:
        if not storage.is_remote(settings.home):
            return settings
        return settings.model_copy(update={"home": str(self.local_home)})


def run_on_storage(
    stage: str,
    call: Callable[..., dict[str, Any]],
    settings: Settings,
    inputs: Mapping[str, str | None],
    out: str,
    **params: Any,
) -> dict[str, Any]:
    """`call(settings=..., out=..., **inputs, **params)` on local folders, with remote inputs and output handled.

    Args:
        stage: the stage name (decides whether the shared cache is synced).
        call: the stage flow or function; it receives local paths (as strings) and returns the manifest as a dict.
        settings: the run's settings; when the artifact root is remote, the call gets a copy whose root is the
            local mirror, so caches and defaults land on local disk.
        inputs: keyword -> location of a finished upstream folder (stage folder or whole run folder), or None.
        out: where the stage's output belongs (local path or URL).
        params: passed through unchanged (labels, flags).

    Returns:
        The manifest (dict) the call returned.
    """
    if not is_remote_run(settings, out, *inputs.values()):
        return call(settings=settings, out=out, **inputs, **params)

    mirror = Mirror(settings)
    opts = mirror.options
    local_inputs = {name: _pull_input(loc, mirror) for name, loc in inputs.items()}
    remote_out = storage.is_remote(out)
    local_out = mirror.local(out) if remote_out else storage.local_path(out)
    before = _mirror_output(out, local_out, opts) if remote_out else None

    local_settings = mirror.settings(settings)
    sync_cache = stage in CACHE_STAGES and storage.is_remote(settings.cache_dir)
    local_cache = Path(local_settings.cache_dir)
    if sync_cache:
        fetched = storage.sync_down(settings.cache_dir, local_cache, storage_options=opts)
        log.info("%s: %d cache files fetched from %s", stage, fetched, settings.cache_dir)
    try:
        result = call(settings=local_settings, out=str(local_out), **local_inputs, **params)
    except BaseException:
        # Share what the failed attempt achieved, so a retry on any machine resumes from it. A folder still
        # holding its manifest was never touched by the stage, so there is nothing to share.
        if remote_out and read_manifest(local_out) is None:
            _best_effort(lambda: storage.push(local_out, out, delete=False, storage_options=opts), out)
        if sync_cache:
            _best_effort(lambda: storage.push(local_cache, settings.cache_dir, delete=False, storage_options=opts), out)
        raise
    if sync_cache:
        storage.push(local_cache, settings.cache_dir, delete=False, storage_options=opts)
    if remote_out and (before is None or before != result.get("fingerprint")):
        (local_out / storage.MIRROR_MARK).unlink(missing_ok=True)  # the folder now holds real output
        storage.push(local_out, out, storage_options=opts)
    return result


def _pull_input(location: str | None, mirror: Mirror) -> str | None:
    """A local path for a finished stage folder or a whole run folder (every finished stage under it)."""
    if location is None or not storage.is_remote(location):
        return location
    opts = mirror.options
    if storage.remote_manifest(location, opts) is not None:
        return str(storage.pull(location, mirror.scratch, dest=mirror.local(location), storage_options=opts))
    folders = storage.find_stage_folders(location, opts)
    if not folders:
        raise DataError(f"{location} holds no finished stage folder (no {MANIFEST_NAME}); run the pipeline first")
    tree = mirror.local(location)
    for rel in folders:
        storage.pull(storage.join(location, rel), mirror.scratch, dest=tree / rel, storage_options=opts)
    return str(tree)


def _mirror_output(out: str, local_out: Path, opts: Mapping[str, Any]) -> str | None:
    """Bring the remote output's state to the local work folder; returns the remote fingerprint, if finished.

    A finished remote folder is represented by its manifest alone, marked as such (the stage skips when it matches;
    when it does not, the stage redoes it anyway). An unfinished one may hold resume state from a failed attempt.
    """
    manifest = storage.remote_manifest(out, opts)
    local_out.mkdir(parents=True, exist_ok=True)
    if manifest is None:
        fetched = storage.sync_down(out, local_out, storage_options=opts)
        if fetched:
            log.info("resuming %s from %d files of an earlier attempt", out, fetched)
        return None
    local = read_manifest(local_out)
    if local is None or local.fingerprint != manifest.fingerprint:
        write_manifest(local_out, manifest)
        (local_out / storage.MIRROR_MARK).touch()
    return manifest.fingerprint


def _best_effort(action: Callable[[], Any], where: str) -> None:
    try:
        action()
    except Exception as exc:  # the stage's own error matters more than a failed upload of partial state
        log.warning("could not save partial state to %s: %s", where, exc)
