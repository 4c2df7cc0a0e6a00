"""Prefect tasks for the prepare stage: fetch, clean and split, each cached on the library's own fingerprint."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.tasks import exponential_backoff

from mathwizard.config import PrepareConfig
from mathwizard.manifest import Manifest, require_manifest
from mathwizard.stages import prepare
from tasks.common import fingerprint_key, retry_if_transient


def _fetch_key(cfg: PrepareConfig, out: str) -> str:
    return prepare.fetch_fingerprint(cfg)


def _clean_key(cfg: PrepareConfig, raw: str, out: str) -> str:
    return prepare.clean_fingerprint(cfg, require_manifest(Path(raw), "prepare").fingerprint)


def _split_key(cfg: PrepareConfig, clean: str, out: str, raw: str | None = None) -> str:
    return prepare.split_fingerprint(cfg, require_manifest(Path(clean), "prepare").fingerprint)


@task(
    name="fetch",
    cache_key_fn=fingerprint_key(_fetch_key),
    persist_result=True,
    retries=3,
    retry_delay_seconds=exponential_backoff(backoff_factor=2),
    retry_jitter_factor=0.5,
    retry_condition_fn=retry_if_transient,
)
def fetch(cfg: PrepareConfig, out: str) -> Manifest:
    """Download or locate MM_Math (hub / local / sample) into `out` (the stage's `raw/`)."""
    return prepare.fetch(cfg, Path(out))


@task(name="clean", cache_key_fn=fingerprint_key(_clean_key), persist_result=True, retries=0)
def clean(cfg: PrepareConfig, raw: str, out: str) -> Manifest:
    """Validate rows and figures into `out` (the stage's `clean/`), quarantining the bad ones."""
    return prepare.clean(cfg, Path(raw), Path(out))


@task(name="split", cache_key_fn=fingerprint_key(_split_key), persist_result=True, retries=0)
def split(cfg: PrepareConfig, clean: str, out: str, raw: str | None = None) -> Manifest:
    """Write the stable train/val/test parquet files, the quarantine and the stage manifest into `out`."""
    return prepare.split(cfg, Path(clean), Path(out), raw=Path(raw) if raw else None)
