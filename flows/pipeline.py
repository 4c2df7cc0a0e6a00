"""The whole pipeline as one Prefect flow: prepare → teach → sft → pairs → dpo → eval (base, sft, dpo) → publish.

Usage: `mathwizard run [--config deployments/recipes/smoke.yaml]`, or the `math-wizard/*` deployments of
`deployments/prefect.yaml` from the UI, whose "Run" form is `PipelineParams` (flows/params.py); in Python,
`math_wizard(PipelineParams(recipe="smoke"))`. Each stage is a subflow that skips itself when its folder's manifest
matches its inputs, so a re-run (or `prefect flow-run retry`) after any failure redoes only what is missing. Stages
named in `settings.orchestration.gpu_deployments` run as deployments on the `cuda` work pool instead of in this
process; they receive artifact locations and hand their manifests back through storage.
"""

from __future__ import annotations

import functools
import importlib
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.deployments import run_deployment

from flows.params import PipelineParams
from mathwizard import storage
from mathwizard.config import STAGE_DIRS, Settings
from mathwizard.errors import ConfigError, MathWizardError
from mathwizard.lock import run_lock
from mathwizard.remote import run_on_storage
from mathwizard.stages import module_name, report_of

REPO = Path(__file__).resolve().parents[1]
__all__ = ["PipelineParams", "data_only", "math_wizard", "run_stage", "stage_flow"]


# ------------------------------------------------------------------------------------------------- stages
def stage_flow(stage: str) -> Callable[..., dict[str, Any]]:
    """The stage's own flow, `flows.<module>:<stage>_flow`, imported when first needed (it pulls in heavy libraries).

    The stages and their order are `config.STAGE_DIRS`; a stage's flow module is named like its library module.
    """
    if stage not in STAGE_DIRS:
        raise ConfigError(f"unknown stage {stage!r}; use one of {', '.join(STAGE_DIRS)}")
    return getattr(importlib.import_module(f"flows.{module_name(stage)}"), f"{stage}_flow")


def run_stage(
    stage: str,
    settings: Settings,
    out: str,
    inputs: dict[str, str | None] | None = None,
    *,
    lock_holder: str,
    **params: Any,
) -> dict[str, Any]:
    """Run one stage here (pulling and pushing remote folders) or, when configured, on its GPU deployment.

    `lock_holder` is the id of the run-folder lock the pipeline holds; a dispatched stage works under it.
    """
    logger = get_run_logger()
    inputs = inputs or {}
    orchestration = settings.orchestration
    deployment = orchestration.gpu_deployments.get(stage) if orchestration.dispatch_gpu_stages else None
    name = f"{stage} ({params['label']})" if "label" in params else stage
    where = f"deployment {deployment}" if deployment else "this flow run"
    logger.info("stage %s: starting on %s → %s", name, where, out)
    started = time.perf_counter()
    if deployment:
        manifest = dispatch(deployment, stage, settings, out, inputs, params, lock_holder)
    else:
        manifest = run_on_storage(stage, stage_flow(stage), settings, inputs, out, **params)
    logger.info(
        "stage %s: done in %.1f s (fingerprint %s)", name, time.perf_counter() - started, manifest["fingerprint"][:12]
    )
    manifest["where"] = where
    return manifest


def dispatch(
    deployment: str,
    stage: str,
    settings: Settings,
    out: str,
    inputs: dict[str, str | None],
    params: dict[str, Any],
    lock_holder: str,
) -> dict[str, Any]:
    """Run the stage as a deployment (a subflow in the UI) and read its manifest from storage when it finishes.

    Only locations travel: the worker pulls the inputs and pushes the output itself, so the manifest is read from
    `out`, which therefore must be on storage both machines see (a URL, or a shared folder).
    """
    run = run_deployment(
        deployment,
        parameters={
            # The scratch folder is the worker's own (its environment or default), not this machine's.
            "settings": settings.model_dump(mode="json", exclude={"orchestration": {"scratch"}}),
            "out": out,
            "inputs": inputs,
            "params": params,
            "lock_holder": lock_holder,
        },
        poll_interval=settings.orchestration.poll_seconds,
        flow_run_name=f"{stage}-{params['label']}" if "label" in params else None,
    )
    state = run.state
    if state is None or not state.is_completed():
        name = state.name if state else "unknown"
        raise MathWizardError(
            f"{stage} on deployment {deployment} ended {name} (flow run {run.id}): {state.message if state else ''}"
        )
    manifest = storage.remote_manifest(out, settings.orchestration.storage_options)
    if manifest is None:
        raise MathWizardError(
            f"{stage} on {deployment} completed but {out} holds no manifest: the worker cannot write there; "
            "put the artifact root (MATHWIZARD_HOME) on storage both machines share"
        )
    return manifest.model_dump(mode="json")


# -------------------------------------------------------------------------------------------------- flows
@contextmanager
def _locked(settings: Settings) -> Iterator[Callable[..., dict[str, Any]]]:
    """The run folder's lock for the flow's duration, and a `run_stage` that works under it."""
    options = settings.orchestration.storage_options
    with run_lock(settings.run_dir, wait_s=settings.orchestration.lock_wait_s, storage_options=options) as holder:
        yield functools.partial(run_stage, lock_holder=holder)


@flow(name="math-wizard", log_prints=True)
def math_wizard(params: PipelineParams = PipelineParams()) -> dict[str, Any]:
    """Every stage in order; returns each stage's manifest fingerprint (eval: per model)."""
    s = params.settings()
    logger = get_run_logger()
    logger.info("run %s under %s", s.run_name, s.home)
    prepared, taught = s.stage_dir("prepare"), s.stage_dir("teach")
    sft, pairs, dpo = s.stage_dir("sft"), s.stage_dir("pairs"), s.stage_dir("dpo")

    with _locked(s) as stage:
        done = {"prepare": stage("prepare", s, prepared)}
        done["teach"] = stage("teach", s, taught, {"data": prepared})
        done["sft"] = stage("sft", s, sft, {"data": taught})
        done["pairs"] = stage("pairs", s, pairs, {"sft": sft, "data": taught})
        done["dpo"] = stage("dpo", s, dpo, {"sft": sft, "pairs": pairs})
        models = {"base": None, "sft": sft, "dpo": dpo}
        for label in s.eval.models:
            out = f"{s.stage_dir('eval')}/{label}"
            done[f"eval-{label}"] = stage("eval", s, out, {"model": models[label], "data": taught}, label=label)
        done["publish"] = stage("publish", s, s.stage_dir("publish"), {"run_dir": s.run_dir})
    return summary(done)


@flow(name="math-wizard-data", log_prints=True)
def data_only(params: PipelineParams = PipelineParams()) -> dict[str, Any]:
    """prepare → teach only: refresh the distilled dataset (e.g. after the source grew) without touching models."""
    s = params.settings()
    with _locked(s) as stage:
        done = {"prepare": stage("prepare", s, s.stage_dir("prepare"))}
        done["teach"] = stage("teach", s, s.stage_dir("teach"), {"data": s.stage_dir("prepare")})
    return summary(done)


def summary(done: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """What a run returns, also shown as a table artifact: per stage where it ran, its seconds and its summary."""
    rows = {
        name: {
            "stage": name,
            "ran on": m.get("where", ""),
            "seconds": m.get("seconds", 0.0),
            "fingerprint": m["fingerprint"][:12],
            "summary": report_of(m["stage"], m).summary(),
        }
        for name, m in done.items()
    }
    create_table_artifact(
        table=list(rows.values()),
        key="pipeline-stages",
        description="Stages of this run (seconds: the stage's whole run when it ran; a skipped stage shows that run)",
    )
    return {name: {k: row[k] for k in ("fingerprint", "seconds", "summary")} for name, row in rows.items()}
