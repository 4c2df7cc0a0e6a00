"""Pushing repo folders to the Hub, and finding the token without ever logging or storing it.

Nothing is sent unless `publish.push` is true (`will_upload`). A push is one `HfApi.create_commit` per repo with
every file of the folder: the library asks the Hub which files it already holds (the preupload call) and leaves
those out, and makes no commit at all when nothing is left, so a re-run with nothing new commits nothing and a
changed card commits only the card. Hub errors become our errors: 5xx, 429 and network failures are
TransientError (Prefect retries them), refusals (401/403, bad metadata) are PublishError.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from mathwizard.config import PublishConfig, load_secrets
from mathwizard.errors import ConfigError, PublishError, TransientError

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


def will_upload(cfg: PublishConfig, token: str | None, *, token_block: str | None = None) -> bool:
    """Upload only when asked (`publish.push`); asked, a token and Hub access are required.

    Raises:
        ConfigError: push without a token, or with HF_HUB_OFFLINE set (before anything is written or sent).
    """
    from huggingface_hub import constants

    if not cfg.push:
        return False
    if constants.is_offline_mode():
        raise ConfigError(
            "publish.push is true but HF_HUB_OFFLINE is set: unset it to upload, or publish without --push"
        )
    if not token:
        block = f", or save one in the Prefect Secret block {token_block!r}" if token_block else ""
        raise ConfigError(
            f"publish.push is true but there is no Hub token: set HF_TOKEN or run `hf auth login`{block};"
            " or publish without --push to write the repos locally"
        )
    return True


def make_api(cfg: PublishConfig, token: str):
    from huggingface_hub import HfApi

    from mathwizard import __version__

    return HfApi(endpoint=cfg.endpoint, token=token, library_name="mathwizard", library_version=__version__)


def push_folder(
    api, repo_id: str, repo_type: str, folder: Path, *, private: bool, message: str, delete_stale: bool = True
) -> PushResult:
    """Create the repo if needed and commit the files of `folder` that differ from the remote (none: no commit).

    `private` applies when the repo is created; an existing repo keeps its visibility. With `delete_stale`, remote
    files the folder no longer has are deleted in the same commit (`.gitattributes` is kept).
    """
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    local = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    additions = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(folder / rel)) for rel in local]
    what = f"{repo_type} repo {repo_id}"
    with hub_errors(what, api.endpoint):
        url = api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
        stale = sorted(set(_remote_files(api, repo_id, repo_type)) - set(local) - KEEP_REMOTE) if delete_stale else []
        deletions = [CommitOperationDelete(path_in_repo=rel) for rel in stale]
        info = api.create_commit(repo_id, [*additions, *deletions], commit_message=message, repo_type=repo_type)
    # create_commit left out each file whose content the Hub already holds: its preupload call records the remote
    # id of every file, and "remote id == local id" is the library's own test for "unchanged" (hf_api.create_commit).
    uploaded = [op.path_in_repo for op in additions if op._remote_oid is None or op._remote_oid != op._local_oid]
    result = PushResult(repo_id, repo_type, str(url), unchanged=len(local) - len(uploaded))
    if not uploaded and not stale:  # the library made no commit (an empty one is skipped)
        log.info("%s is up to date (%d files); nothing to commit", what, len(local))
        return result
    result.commit, result.uploaded, result.deleted = info.oid, uploaded, stale
    log.info("%s: committed %s (%d uploaded, %d deleted)", what, info.oid, len(uploaded), len(stale))
    return result


def _remote_files(api, repo_id: str, repo_type: str) -> list[str]:
    """Paths on the remote main branch; empty for a repo without commits."""
    from huggingface_hub.errors import EntryNotFoundError, RevisionNotFoundError

    try:
        return api.list_repo_files(repo_id, repo_type=repo_type)
    except (EntryNotFoundError, RevisionNotFoundError):
        return []


@contextmanager
def hub_errors(what: str, endpoint: str) -> Iterator[None]:
    """Hub and network failures as one-line MathWizard errors; transient ones are marked for retry."""
    import httpx
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    try:
        yield
    except OfflineModeIsEnabled:
        raise ConfigError("HF_HUB_OFFLINE is set: unset it to upload, or publish without --push") from None
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
