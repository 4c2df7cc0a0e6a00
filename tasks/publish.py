"""Prefect task for the publish stage: retried on Hub/network hiccups only, cached on the library's fingerprint.

The Hub token may come from a Prefect Secret block (`publish.token_block`, default "hf-token"); it is read inside
the task at call time, so it is never a task parameter, never part of a cache key or a persisted result.
"""

from __future__ import annotations

import logging
from pathlib import Path

from prefect import task
from prefect.tasks import exponential_backoff

from mathwizard.config import PublishConfig
from mathwizard.manifest import Manifest
from mathwizard.publish.hub import resolve_token, will_upload
from mathwizard.stages import publish as stage
from tasks.common import fingerprint_key, retry_if_transient

log = logging.getLogger(__name__)


def secret_block_token(name: str | None) -> str | None:
    """The value of the Prefect Secret block `name`, or None when there is no such block (or no name)."""
    if not name:
        return None
    from prefect.blocks.system import Secret

    try:
        return str(Secret.load(name).get())
    except ValueError:  # no block of that name: fall back to HF_TOKEN / the HF login
        return None


def fingerprint_of(cfg: PublishConfig, run_dir: str, out: str) -> str:
    """The stage's fingerprint, with the destination decided by the token found now (the block's first)."""
    upload = will_upload(cfg, resolve_token(secret_block_token(cfg.token_block)))
    return stage.expected_fingerprint(cfg, Path(run_dir), upload=upload)


@task(
    name="publish",
    cache_key_fn=fingerprint_key(fingerprint_of),
    persist_result=True,
    retries=3,
    retry_delay_seconds=exponential_backoff(backoff_factor=2),
    retry_jitter_factor=0.5,
    retry_condition_fn=retry_if_transient,
)
def publish(cfg: PublishConfig, run_dir: str, out: str) -> Manifest:
    """Push the run's DPO model and SFT/DPO datasets to the Hub, or lay them out in the target folder."""
    return stage.run(cfg, Path(run_dir), Path(out), token=secret_block_token(cfg.token_block))
