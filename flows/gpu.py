"""The GPU stages as deployable flows for the `cuda` work pool: they take artifact locations, not objects.

The pipeline dispatches them with `run_deployment("math-wizard-gpu-sft/sft-on-cuda", ...)` (see `gpu_deployments`
in the settings). Each pulls its inputs from the shared artifact root, runs the stage's own flow on local folders and
pushes the output back, manifest last; the pipeline then reads that manifest from storage.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.pipeline import stage_flow
from mathwizard.config import Settings
from mathwizard.lock import run_lock
from mathwizard.remote import run_on_storage


def _on_worker(
    stage: str,
    settings: Settings,
    out: str,
    inputs: dict[str, str | None] | None,
    params: dict[str, Any] | None,
    lock_holder: str | None,
) -> dict[str, Any]:
    """The stage under its run's lock: the dispatching pipeline's (`lock_holder`), or its own when started alone."""
    options = settings.orchestration.storage_options
    with run_lock(settings.run_dir, holder=lock_holder, storage_options=options):
        return run_on_storage(stage, stage_flow(stage), settings, inputs or {}, out, **(params or {}))


@flow(name="math-wizard-gpu-sft", log_prints=True)
def sft_on_worker(
    settings: Settings,
    out: str,
    inputs: dict[str, str | None] | None = None,
    params: dict[str, Any] | None = None,
    lock_holder: str | None = None,
) -> dict[str, Any]:
    """SFT on this worker; inputs: {'data': <02-teach location>}."""
    return _on_worker("sft", settings, out, inputs, params, lock_holder)


@flow(name="math-wizard-gpu-pairs", log_prints=True)
def pairs_on_worker(
    settings: Settings,
    out: str,
    inputs: dict[str, str | None] | None = None,
    params: dict[str, Any] | None = None,
    lock_holder: str | None = None,
) -> dict[str, Any]:
    """DPO pairs on this worker; inputs: {'sft': <03-sft location>, 'data': <02-teach location>}."""
    return _on_worker("pairs", settings, out, inputs, params, lock_holder)


@flow(name="math-wizard-gpu-dpo", log_prints=True)
def dpo_on_worker(
    settings: Settings,
    out: str,
    inputs: dict[str, str | None] | None = None,
    params: dict[str, Any] | None = None,
    lock_holder: str | None = None,
) -> dict[str, Any]:
    """DPO on this worker; inputs: {'sft': <03-sft location>, 'pairs': <04-pairs location>}."""
    return _on_worker("dpo", settings, out, inputs, params, lock_holder)


@flow(name="math-wizard-gpu-eval", log_prints=True)
def eval_on_worker(
    settings: Settings,
    out: str,
    inputs: dict[str, str | None] | None = None,
    params: dict[str, Any] | None = None,
    lock_holder: str | None = None,
) -> dict[str, Any]:
    """Evaluation on this worker; inputs: {'model': <stage folder or None for base>, 'data': ...}, params: label."""
    return _on_worker("eval", settings, out, inputs, params, lock_holder)
