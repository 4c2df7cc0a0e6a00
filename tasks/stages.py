"""The Prefect task of every stage: the library's `run`, plus the stage's operational policy in the decorator.

Whether a stage runs or is skipped is decided by the stage itself, from its folder's manifest
(`mathwizard.manifest.reusable`); so no task keeps a Prefect cache (`NO_CACHE`): two caches could disagree.
Retries: fetching and publishing retry network hiccups; teach at most once (per-item retries happen inside); teach
in batch mode every `BATCH_RETRY_DELAY_S` for a day (each attempt waits at most `teacher.batch_wait_s` for its
batches, then stops with BatchPending: the wait between attempts is Prefect's, holding no connection and running no
loop of ours); the GPU stages never (an OOM repeats itself; a re-run resumes from the last checkpoint or chunk).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from mathwizard.config import (
    DPOConfig,
    EvalConfig,
    ModelConfig,
    PairsConfig,
    PrepareConfig,
    PublishConfig,
    SFTConfig,
    TeacherConfig,
)
from mathwizard.errors import is_transient
from mathwizard.manifest import Manifest
from mathwizard.progress import Progress
from mathwizard.stages import dpo as dpo_stage
from mathwizard.stages import evaluate as eval_stage
from mathwizard.stages import pairs as pairs_stage
from mathwizard.stages import prepare as prepare_stage
from mathwizard.stages import publish as publish_stage
from mathwizard.stages import sft as sft_stage
from mathwizard.stages import teach as teach_stage


def retry_if_transient(task: Any, task_run: Any, state: Any) -> bool:
    """retry_condition_fn: retry network/Hub/API hiccups, never our permanent errors (bad config, bad data)."""
    try:
        state.result()
    except Exception as exc:
        return is_transient(exc)
    return False


def library_logs_to_the_ui() -> None:
    """The library's INFO lines (rows kept, chunks written, accuracy) in the flow run logs, also in a worker whose
    environment lacks PREFECT_LOGGING_EXTRA_LOGGERS=mathwizard (the `mathwizard` logger would stay at WARNING)."""
    from prefect.logging.handlers import APILogHandler

    logger = logging.getLogger("mathwizard")
    if logger.level == logging.NOTSET or logger.level > logging.INFO:
        logger.setLevel(logging.INFO)
    if not any(isinstance(handler, APILogHandler) for handler in logger.handlers):
        handler = APILogHandler()
        handler.addFilter(_in_a_run)  # the library also runs outside flows (tests, scripts): no warning there
        logger.addHandler(handler)


def _in_a_run(record: logging.LogRecord) -> bool:
    from prefect.context import FlowRunContext, TaskRunContext

    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


library_logs_to_the_ui()

_NETWORK_RETRIES = {
    "retries": 3,
    "retry_delay_seconds": exponential_backoff(backoff_factor=2),
    "retry_jitter_factor": 0.5,
    "retry_condition_fn": retry_if_transient,
}


@task(name="prepare", cache_policy=NO_CACHE, **_NETWORK_RETRIES)
def prepare(cfg: PrepareConfig, out: str) -> Manifest:
    """Fetch, clean and split MM_Math into `out`."""
    return prepare_stage.run(cfg, Path(out))


@task(name="teach", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=30, retry_condition_fn=retry_if_transient)
def teach(cfg: TeacherConfig, data: str, out: str, cache_dir: str, progress: Progress | None = None) -> Manifest:
    """Rewrite the prepared splits in `data` into `out`, replies cached per item in `cache_dir`."""
    return teach_stage.run(cfg, Path(data), Path(out), Path(cache_dir), progress=progress)


BATCH_RETRY_DELAY_S = 600  # with teacher.batch_wait_s (600 s by default): a status check about every 10-20 minutes
BATCH_RETRIES = 24 * 3600 // BATCH_RETRY_DELAY_S  # the Batch API's completion window: 24 hours of waits


@task(
    name="teach-batch",
    cache_policy=NO_CACHE,
    retries=BATCH_RETRIES,
    retry_delay_seconds=BATCH_RETRY_DELAY_S,
    retry_condition_fn=retry_if_transient,
)
def teach_batch(cfg: TeacherConfig, data: str, out: str, cache_dir: str, progress: Progress | None = None) -> Manifest:
    """Teach through the Batch API: each attempt resumes the journal's batches, waits for them at most
    `teacher.batch_wait_s`, and raises BatchPending (transient: retried after the delay) while they still run."""
    return teach_stage.run(cfg, Path(data), Path(out), Path(cache_dir), progress=progress)


@task(name="sft", cache_policy=NO_CACHE, retries=0)
def sft(cfg: SFTConfig, model: ModelConfig, data: str, out: str, progress: Progress | None = None) -> Manifest:
    """Train the SFT LoRA adapter on the teach output in `data`, into `out`."""
    return sft_stage.run(cfg, model, Path(data), Path(out), progress=progress)


@task(name="pairs", cache_policy=NO_CACHE, retries=0)
def pairs(
    cfg: PairsConfig, model_cfg: ModelConfig, model: str, data: str, out: str, progress: Progress | None = None
) -> Manifest:
    """Sample and check flawed answers from `model` (the SFT folder) for the teach output in `data`, into `out`."""
    return pairs_stage.run(cfg, model_cfg, model, Path(data), Path(out), progress=progress)


@task(name="dpo", cache_policy=NO_CACHE, retries=0)
def dpo(
    cfg: DPOConfig, model: ModelConfig, sft: str | None, pairs: str, out: str, progress: Progress | None = None
) -> Manifest:
    """Align the SFT model in `sft` with DPO on the pairs in `pairs`, into `out`."""
    return dpo_stage.run(cfg, model, Path(sft) if sft else None, Path(pairs), Path(out), progress=progress)


@task(name="eval", task_run_name="eval-{label}", cache_policy=NO_CACHE, retries=0)
def evaluate(
    cfg: EvalConfig,
    model_cfg: ModelConfig,
    model: str,
    data: str,
    out: str,
    label: str,
    progress: Progress | None = None,
) -> Manifest:
    """Evaluate `model` (a stage folder, model dir, 'tiny' or Hub id) on `data` into `out`."""
    return eval_stage.run(cfg, model_cfg, model, Path(data), Path(out), label, progress=progress)


@task(name="publish", cache_policy=NO_CACHE, **_NETWORK_RETRIES)
def publish(cfg: PublishConfig, run_dir: str, out: str) -> Manifest:
    """Push the run's DPO model and SFT/DPO datasets to the Hub, or lay them out in the target folder.

    The Hub token may come from a Prefect Secret block (`publish.token_block`); it is read here, at call time and
    only with `publish.push`, so it is never a task parameter nor part of a persisted result.
    """
    token = secret_block_token(cfg.token_block) if cfg.push else None
    return publish_stage.run(cfg, Path(run_dir), Path(out), token=token, token_block=cfg.token_block)


def secret_block_token(name: str | None) -> str | None:
    """The value of the Prefect Secret block `name`, or None when there is no such block (or no name)."""
    if not name:
        return None
    from prefect.blocks.system import Secret

    try:
        return str(Secret.load(name).get())
    except ValueError:  # no block of that name: fall back to HF_TOKEN / the HF login
        return None
