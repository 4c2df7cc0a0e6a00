"""Prefect tasks for the teach stage: the whole stage in one task, or its chunks and the final assembly.

The per-item retries, cache and validation live in the library; these tasks only add Prefect's policy. Chunk tasks
are not cached by Prefect: the library's per-item cache makes a re-run of a finished chunk cost no API call.
"""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from mathwizard.config import TeacherConfig
from mathwizard.manifest import Manifest
from mathwizard.stages import teach as stage
from tasks.common import fingerprint_key, retry_if_transient


def _fingerprint(cfg: TeacherConfig, data: str, **_: object) -> str:
    return stage.expected_fingerprint(cfg, Path(data))


@task(
    name="teach",
    cache_key_fn=fingerprint_key(_fingerprint),
    persist_result=True,
    retries=1,
    retry_delay_seconds=30,
    retry_condition_fn=retry_if_transient,
)
def teach(cfg: TeacherConfig, data: str, out: str, cache_dir: str) -> Manifest:
    """The whole stage in one call (per-item retries happen inside, so at most one retry here)."""
    return stage.run(cfg, Path(data), Path(out), Path(cache_dir))


@task(
    name="teach-chunk",
    task_run_name="teach-{chunk.split}-{chunk.start}",
    cache_policy=NO_CACHE,
    retries=1,
    retry_delay_seconds=30,
    retry_condition_fn=retry_if_transient,
)
def teach_chunk(cfg: TeacherConfig, data: str, cache_dir: str, chunk: stage.Chunk, session: str) -> stage.ChunkResult:
    """Fill the reply cache for one chunk; chunks of one session share the API limits."""
    return stage.run_chunk(cfg, Path(data), Path(cache_dir), chunk, session=session)


@task(name="teach-assemble", cache_policy=NO_CACHE, retries=0)
def teach_assemble(
    cfg: TeacherConfig, data: str, out: str, cache_dir: str, results: list[stage.ChunkResult], started_at: float
) -> Manifest:
    """Write the splits, failures and report from the cache, then the manifest."""
    return stage.assemble(cfg, Path(data), Path(out), Path(cache_dir), results, started_at=started_at)
