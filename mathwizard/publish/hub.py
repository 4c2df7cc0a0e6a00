"""Pushing repo folders to the Hub idempotently, and finding the token without ever logging or storing it.

Idempotence: before committing, the remote tree is listed and each local file compared with it (sha256 for LFS
files, the git blob id for regular ones), so a re-run with nothing new sends no commit at all; a changed card
commits only the card. Hub errors become our errors: 5xx, 429 and network failures are TransientError
(Prefect retries them), refusals (401/403, bad metadata) are PublishError.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from mathwizard.config import PublishConfig, load_secrets
from mathwizard.errors import ConfigError, PublishError, TransientError
from mathwizard.manifest import file_sha256

log = logging.getLogger(__name__)

KEEP_REMOTE = frozenset({".gitattributes"})  # the Hub creates it; it decides which files are LFS


@dataclass
class PushResult:
    """What one repo push did (no token, no absolute local paths: this goes into the manifest)."""

    repo_id: str
    repo_type: str
    url: str
    commit: str | None = None
    uploaded: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    unchanged: int = 0


def resolve_token(token: str | None = None) -> str | None:
    """The Hub token: the one given (a Prefect Secret block, read by the task), else HF_TOKEN or
    MATHWIZARD_HF_TOKEN (environment or .env), else the Hugging Face login (`hf auth login`)."""
    if token:
        return token
    secret = load_secrets().hf_token
    if secret is not None and secret.get_secret_value():
        return secret.get_secret_value()
    from huggingface_hub import get_token

    try:
        return get_token()
    except Exception as exc:  # an OIDC exchange that failed: report the kind only, never the details
        log.warning("could not read the Hugging Face login (%s); publishing locally", type(exc).__name__)
        return None


def will_upload(cfg: PublishConfig, token: str | None) -> bool:
    """Upload only with a token, no `target` folder and Hub access allowed (HF_HUB_OFFLINE unset)."""
    from huggingface_hub import constants

    return bool(token) and cfg.target is None and not constants.is_offline_mode()


def make_api(cfg: PublishConfig, token: str):
    from huggingface_hub import HfApi

    from mathwizard import __version__

    return HfApi(endpoint=cfg.endpoint, token=token, library_name="mathwizard", library_version=__version__)


def push_folder(
    api, repo_id: str, repo_type: str, folder: Path, *, private: bool, message: str, delete_stale: bool = True
) -> PushResult:
    """Create the repo if needed and commit the files of `folder` that differ from the remote (none: no commit).

    `private` applies when the repo is created; an existing repo keeps its visibility.
    """
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    local = {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}
    what = f"{repo_type} repo {repo_id}"
    with hub_errors(what, api.endpoint):
        url = api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
        remote = _remote_files(api, repo_id, repo_type)
        changed = [rel for rel, path in local.items() if _differs(path, remote.get(rel))]
        stale = sorted(set(remote) - set(local) - KEEP_REMOTE) if delete_stale else []
        result = PushResult(repo_id, repo_type, str(url), unchanged=len(local) - len(changed))
        if not changed and not stale:
            log.info("%s is up to date (%d files); nothing to commit", what, len(local))
            return result
        operations = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(local[rel])) for rel in changed]
        operations += [CommitOperationDelete(path_in_repo=rel) for rel in stale]
        description = "\n".join([*(f"- add/update {r}" for r in changed), *(f"- delete {r}" for r in stale)])
        info = api.create_commit(
            repo_id, operations, commit_message=message, commit_description=description, repo_type=repo_type
        )
    result.commit, result.uploaded, result.deleted = info.oid, changed, stale
    log.info("%s: committed %s (%d uploaded, %d deleted)", what, info.oid, len(changed), len(stale))
    return result


def _remote_files(api, repo_id: str, repo_type: str) -> dict:
    """Path -> RepoFile of the remote main branch; empty for a repo without commits."""
    from huggingface_hub import RepoFile
    from huggingface_hub.errors import EntryNotFoundError, RevisionNotFoundError

    try:
        return {
            f.path: f
            for f in api.list_repo_tree(repo_id, repo_type=repo_type, recursive=True)
            if isinstance(f, RepoFile)
        }
    except (EntryNotFoundError, RevisionNotFoundError):
        return {}


def _differs(path: Path, remote) -> bool:
    if remote is None or remote.size != path.stat().st_size:
        return True
    if remote.lfs is not None:
        return remote.lfs.sha256 != file_sha256(path)
    return remote.blob_id != git_blob_id(path)


def git_blob_id(path: Path) -> str:
    """The git object id of a file's content, as the Hub reports for regular (non-LFS) files."""
    data = Path(path).read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@contextmanager
def hub_errors(what: str, endpoint: str) -> Iterator[None]:
    """Hub and network failures as one-line MathWizard errors; transient ones are marked for retry."""
    import httpx
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    try:
        yield
    except OfflineModeIsEnabled:
        raise ConfigError("HF_HUB_OFFLINE is set: unset it to upload, or publish into a folder with --target") from None
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        reason = " ".join(str(exc).split())[:300]
        if status is None or status >= 500 or status in (408, 429):
            raise TransientError(f"the Hub at {endpoint} failed on {what} ({status}); retry later: {reason}") from exc
        if status in (401, 403):
            raise PublishError(
                f"the Hub at {endpoint} refused {what} ({status}): the token (HF_TOKEN, `hf auth login` or the"
                " Prefect Secret block) needs write access to that namespace"
            ) from exc
        raise PublishError(f"the Hub at {endpoint} rejected {what} ({status}): {reason}") from exc
    except httpx.TransportError as exc:
        kind = type(exc).__name__
        raise TransientError(f"cannot reach the Hub at {endpoint} for {what} ({kind}); retry later") from exc
    except ValueError as exc:  # huggingface_hub's own checks, e.g. invalid README metadata
        reason = " ".join(str(exc).split())[:300]
        raise PublishError(f"the Hub at {endpoint} rejected {what}: {reason}") from exc
