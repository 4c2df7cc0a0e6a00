"""The stage tasks: the exact decorator policy of each (so a change shows up in a diff), the retry condition, and
that each body is the stage's `run` with the task's arguments as paths."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from prefect.cache_policies import NO_CACHE

from mathwizard.config import load_settings
from mathwizard.errors import DataError, PublishError, TransientError
from tasks import stages
from tasks.stages import retry_if_transient

# name, retries, retry delays, jitter, retry condition, task run name; every task: cache_policy=NO_CACHE.
POLICY = {
    "prepare": ("prepare", 3, [2, 4, 8], 0.5, retry_if_transient, None),  # exponential_backoff(2) over 3 retries
    "teach": ("teach", 1, 30, None, retry_if_transient, None),  # per-item retries happen inside the stage
    # batch mode: an attempt waits at most teacher.batch_wait_s; BatchPending is retried every 10 min for 24 h
    "teach_batch": ("teach-batch", 144, 600, None, retry_if_transient, None),
    "sft": ("sft", 0, 0, None, None, None),  # an OOM repeats itself; a re-run resumes from the last checkpoint
    "pairs": ("pairs", 0, 0, None, None, None),
    "dpo": ("dpo", 0, 0, None, None, None),
    "evaluate": ("eval", 0, 0, None, None, "eval-{label}"),
    "publish": ("publish", 3, [2, 4, 8], 0.5, retry_if_transient, None),
}


@pytest.mark.parametrize("attribute", POLICY)
def test_decorator_settings(attribute: str) -> None:
    task = getattr(stages, attribute)
    settings = (
        task.name,
        task.retries,
        task.retry_delay_seconds,
        task.retry_jitter_factor,
        task.retry_condition_fn,
        task.task_run_name,
    )
    assert settings == POLICY[attribute]
    # The stage's manifest alone decides whether it runs: no Prefect cache that could disagree with it.
    assert task.cache_policy is NO_CACHE
    assert (task.cache_key_fn, task.cache_expiration, task.refresh_cache, task.timeout_seconds) == (None,) * 4


def test_every_stage_has_exactly_one_task() -> None:
    from prefect import Task

    tasks = {name for name, value in vars(stages).items() if isinstance(value, Task)}
    assert tasks == set(POLICY)


def _state(error: BaseException | None) -> SimpleNamespace:
    def result() -> Any:
        if error is not None:
            raise error
        return "manifest"

    return SimpleNamespace(result=result)


@pytest.mark.parametrize(
    ("error", "retry"),
    [
        (TransientError("Hub answered 503"), True),
        (ConnectionResetError(), True),
        (TimeoutError(), True),
        (DataError("no manifest.json"), False),
        (PublishError("refused (401)"), False),
        (FileNotFoundError("x"), False),
        (ValueError("a bug"), False),
        (None, False),
    ],
)
def test_retry_only_what_can_recover(error: BaseException | None, retry: bool) -> None:
    assert retry_if_transient(None, None, _state(error)) is retry


def test_no_secret_block_name_means_no_token() -> None:
    assert stages.secret_block_token(None) is None and stages.secret_block_token("") is None


# --------------------------------------------------------------------------------------------- the bodies
@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, tuple, dict]]:
    """Every stage module's `run` replaced by a recorder returning its arguments."""
    seen: list[tuple[str, tuple, dict]] = []
    for module in ("prepare", "teach", "sft", "pairs", "dpo", "eval", "publish"):
        stage = getattr(stages, f"{module}_stage")

        def run(*args: Any, _name: str = module, **kwargs: Any) -> str:
            seen.append((_name, args, kwargs))
            return f"{_name} manifest"

        monkeypatch.setattr(stage, "run", run)
    return seen


def test_task_bodies_call_the_stage_with_paths(calls: list, monkeypatch: pytest.MonkeyPatch) -> None:
    s = load_settings()
    progress = object()
    monkeypatch.setattr(stages, "secret_block_token", lambda name: f"token from {name}")

    assert stages.prepare.fn(s.prepare, "o") == "prepare manifest"
    stages.teach.fn(s.teacher, "d", "o", "c", progress=progress)
    stages.sft.fn(s.sft, s.model, "d", "o", progress=progress)
    stages.pairs.fn(s.pairs, s.model, "m", "d", "o", progress=progress)
    stages.dpo.fn(s.dpo, s.model, "s", "p", "o", progress=progress)
    stages.dpo.fn(s.dpo, s.model, None, "p", "o")  # no SFT folder: DPO on the base model
    stages.evaluate.fn(s.eval, s.model, "m", "d", "o", "base", progress=progress)
    stages.publish.fn(s.publish.model_copy(update={"token_block": "hf"}), "r", "o")  # no push: the block is not read
    stages.publish.fn(s.publish.model_copy(update={"token_block": "hf", "push": True}), "r", "o")

    d, o = Path("d"), Path("o")
    assert calls == [
        ("prepare", (s.prepare, o), {}),
        ("teach", (s.teacher, d, o, Path("c")), {"progress": progress}),
        ("sft", (s.sft, s.model, d, o), {"progress": progress}),
        ("pairs", (s.pairs, s.model, "m", d, o), {"progress": progress}),
        ("dpo", (s.dpo, s.model, Path("s"), Path("p"), o), {"progress": progress}),
        ("dpo", (s.dpo, s.model, None, Path("p"), o), {"progress": None}),
        ("eval", (s.eval, s.model, "m", d, o, "base"), {"progress": progress}),
        (
            "publish",
            (s.publish.model_copy(update={"token_block": "hf"}), Path("r"), o),
            {"token": None, "token_block": "hf"},
        ),
        (
            "publish",
            (s.publish.model_copy(update={"token_block": "hf", "push": True}), Path("r"), o),
            {"token": "token from hf", "token_block": "hf"},
        ),
    ]


def test_the_librarys_info_lines_reach_the_flow_run_logs(prefect_harness: None) -> None:
    """Under a worker nobody sets PREFECT_LOGGING_EXTRA_LOGGERS; importing the tasks still sends the library's logs."""
    import logging

    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.context import get_run_context
    from prefect.logging.handlers import APILogHandler

    stages.library_logs_to_the_ui()  # idempotent: one API handler however often the module is loaded
    handlers = [h for h in logging.getLogger("mathwizard").handlers if isinstance(h, APILogHandler)]
    assert len(handlers) == 1

    @flow
    def logs() -> str:
        logging.getLogger("mathwizard.stages.prepare").info("kept 57 of 60 rows")
        return str(get_run_context().flow_run.id)

    run_id = logs()
    APILogHandler().flush()

    async def read() -> list[str]:
        async with get_client() as client:
            found = await client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
            return [log.message for log in found]

    import asyncio

    assert "kept 57 of 60 rows" in asyncio.run(read())
