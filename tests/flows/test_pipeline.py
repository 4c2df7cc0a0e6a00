"""flows/pipeline.py without a server: parameters, stage order, GPU dispatch (run_deployment faked), the CLI edge."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from flows import pipeline
from flows.pipeline import PipelineParams, resolve
from mathwizard.config import load_settings
from mathwizard.errors import ConfigError, MathWizardError
from mathwizard.manifest import stage_output
from tests.flows.artifacts import table

REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------------ params
def test_params_load_the_recipe_from_any_directory(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # a worker may start elsewhere: the recipe path is relative to the repository
    settings = PipelineParams(recipe="deployments/recipes/smoke.yaml", home="/data/mw").settings()
    assert (settings.run_name, settings.model.name, settings.home) == ("smoke", "tiny", "/data/mw")


def test_overrides_win_and_may_set_none() -> None:
    params = PipelineParams(
        recipe="deployments/recipes/smoke.yaml", overrides={"teacher": {"rpm": None}, "sft": {"max_steps": 7}}
    )
    settings = params.settings()
    assert settings.teacher.rpm is None  # load_settings alone would drop a None
    assert settings.sft.max_steps == 7
    assert settings.sft.per_device_train_batch_size == 1  # the recipe's value beside the override survives


def test_bad_override_is_one_config_error() -> None:
    with pytest.raises(ConfigError, match=r"sft\.max_step: Extra inputs"):
        PipelineParams(overrides={"sft": {"max_step": 7}}).settings()


def test_params_and_settings_are_exclusive() -> None:
    settings = load_settings()
    assert resolve(None, settings) is settings
    assert resolve(PipelineParams(), settings) is settings  # the default form is "no params"
    with pytest.raises(ConfigError, match="not both"):
        resolve(PipelineParams(run_name="x"), settings)


# ------------------------------------------------------------------------------------------ stage order
def test_pipeline_runs_every_stage_in_order_with_locations(prefect_harness, tmp_path: Path, monkeypatch) -> None:
    calls: list[tuple[str, dict[str, Any]]] = []

    def fake_flow(stage: str):
        def run(settings, out: str, **inputs: Any) -> dict[str, Any]:
            calls.append((stage, {"out": out, **inputs}))
            label = inputs.get("label", "")
            return {"stage": stage, "fingerprint": f"fp-{stage}-{label}".ljust(16, "0"), "report": {}, "seconds": 0.5}

        return run

    class Done:
        def __init__(self, stage: str) -> None:
            self.stage = stage

        def summary(self) -> str:
            return f"{self.stage} done"

    monkeypatch.setattr(pipeline, "stage_flow", fake_flow)
    monkeypatch.setattr(pipeline, "report_of", lambda stage, manifest: Done(stage))
    settings = load_settings(home=str(tmp_path), run_name="r")
    result = pipeline.math_wizard(settings=settings)

    run = f"{tmp_path}/runs/r"
    assert calls == [
        ("prepare", {"out": f"{run}/01-prepare"}),
        ("teach", {"out": f"{run}/02-teach", "data": f"{run}/01-prepare"}),
        ("sft", {"out": f"{run}/03-sft", "data": f"{run}/02-teach"}),
        ("pairs", {"out": f"{run}/04-pairs", "sft": f"{run}/03-sft", "data": f"{run}/02-teach"}),
        ("dpo", {"out": f"{run}/05-dpo", "sft": f"{run}/03-sft", "pairs": f"{run}/04-pairs"}),
        ("eval", {"out": f"{run}/06-eval/base", "model": None, "data": f"{run}/02-teach", "label": "base"}),
        ("eval", {"out": f"{run}/06-eval/sft", "model": f"{run}/03-sft", "data": f"{run}/02-teach", "label": "sft"}),
        ("eval", {"out": f"{run}/06-eval/dpo", "model": f"{run}/05-dpo", "data": f"{run}/02-teach", "label": "dpo"}),
        ("publish", {"out": f"{run}/07-publish", "run_dir": run}),
    ]
    assert list(result) == ["prepare", "teach", "sft", "pairs", "dpo", "eval-base", "eval-sft", "eval-dpo", "publish"]
    assert result["eval-sft"] == {"fingerprint": "fp-eval-sft0", "seconds": 0.5, "summary": "eval done"}  # 12 chars
    assert result["prepare"] == {"fingerprint": "fp-prepare-0", "seconds": 0.5, "summary": "prepare done"}


def test_teacher_only_runs_prepare_then_teach(prefect_harness, tmp_path: Path, monkeypatch) -> None:
    calls: list[str] = []

    def fake_flow(stage: str):
        def run(settings, out: str, **inputs: Any) -> dict[str, Any]:
            calls.append(stage)
            return {"stage": stage, "fingerprint": stage * 4, "report": {}, "seconds": 1.0}

        return run

    monkeypatch.setattr(pipeline, "stage_flow", fake_flow)
    monkeypatch.setattr(pipeline, "report_of", lambda stage, manifest: SimpleNamespace(summary=lambda: stage))
    result = pipeline.teacher_only(settings=load_settings(home=str(tmp_path)))
    assert calls == ["prepare", "teach"] and list(result) == ["prepare", "teach"]


def test_summary_is_each_stages_report_in_one_line(prefect_harness, tmp_path: Path) -> None:
    from mathwizard.stages import prepare, publish

    prepared = prepare.Report(
        source="sample", resolved_revision=None, rows_in=60, kept=60, quarantined=0, resized=22,
        quarantine_reasons={}, splits={"train": 51, "val": 4, "test": 5}, workers=2,
    )  # fmt: skip
    published = publish.Report(destination="local", endpoint=None, root="/r", repos=[])
    done = {
        "prepare": {"stage": "prepare", "fingerprint": "a" * 64, "seconds": 3.25, "report": prepared.model_dump()},
        "publish": {"stage": "publish", "fingerprint": "b" * 64, "seconds": 0.5, "report": published.model_dump(),
                    "where": "this flow run"},
    }  # fmt: skip

    @pipeline.flow
    def run() -> dict[str, Any]:
        return pipeline.summary(done)

    assert run() == {
        "prepare": {"fingerprint": "a" * 12, "seconds": 3.25, "summary": prepared.summary()},
        "publish": {"fingerprint": "b" * 12, "seconds": 0.5, "summary": "0 repos written under /r (not uploaded)"},
    }
    rows = table("pipeline-stages")
    assert [r["stage"] for r in rows] == ["prepare", "publish"] and rows[1]["ran on"] == "this flow run"
    assert rows[0]["summary"] == "60 of 60 rows kept (train 51 · val 4 · test 5), 0 quarantined"


def test_every_stage_has_its_flow_in_pipeline_order() -> None:
    from mathwizard.config import STAGE_DIRS

    names = {stage: pipeline.stage_flow(stage).name for stage in STAGE_DIRS}
    assert names == {stage: stage for stage in STAGE_DIRS}  # each flow is named after its stage
    with pytest.raises(ConfigError, match="unknown stage 'evaluate'; use one of prepare, teach, sft"):
        pipeline.stage_flow("evaluate")


# -------------------------------------------------------------------------------------------- dispatch
class FakeDeployments:
    """Stands in for run_deployment: records the call, 'runs' the stage by writing its manifest, returns the run."""

    def __init__(self, state: str = "COMPLETED", writes: bool = True) -> None:
        self.calls: list[dict[str, Any]] = []
        self.state, self.writes = state, writes

    def __call__(self, name: str, parameters: dict[str, Any], **kwargs: Any) -> SimpleNamespace:
        self.calls.append({"name": name, "parameters": parameters, **kwargs})
        if self.writes:
            with stage_output(Path(parameters["out"]), stage="sft", version=1, fingerprint="f" * 64):
                pass
        completed = self.state == "COMPLETED"
        state = SimpleNamespace(name=self.state.title(), message="boom", is_completed=lambda: completed)
        return SimpleNamespace(id="run-1", state=state)


def gpu_settings(tmp_path: Path):
    return load_settings(
        home=str(tmp_path),
        orchestration={"gpu_deployments": {"sft": "mathwizard-sft/cuda"}, "poll_seconds": 1, "scratch": "/here"},
    )


def test_gpu_stage_is_dispatched_with_locations(prefect_harness, tmp_path: Path, monkeypatch) -> None:
    fake = FakeDeployments()
    monkeypatch.setattr(pipeline, "run_deployment", fake)
    monkeypatch.setattr(pipeline, "stage_flow", lambda stage: pytest.fail(f"{stage} must not run in this process"))
    settings = gpu_settings(tmp_path)

    @pipeline.flow
    def parent() -> dict[str, Any]:
        inputs = {"data": settings.stage_dir("teach")}
        return pipeline.run_stage("sft", settings, settings.stage_dir("sft"), inputs, lock_holder="holder-1")

    manifest = parent()
    [call] = fake.calls
    assert call["name"] == "mathwizard-sft/cuda" and call["poll_interval"] == 1
    sent = call["parameters"]
    assert sent["out"] == settings.stage_dir("sft") and sent["inputs"] == {"data": settings.stage_dir("teach")}
    assert "scratch" not in sent["settings"]["orchestration"]  # the worker's own scratch folder applies there
    assert sent["settings"]["home"] == str(tmp_path)
    assert sent["lock_holder"] == "holder-1"  # the worker's stage joins the pipeline's run-folder lock
    assert manifest["fingerprint"] == "f" * 64  # read back from the stage folder, not from Prefect's result


@pytest.mark.parametrize(
    ("fake", "message"),
    [
        (FakeDeployments(state="FAILED", writes=False), "ended Failed"),
        (FakeDeployments(writes=False), "holds no manifest"),
    ],
    ids=["child-failed", "no-shared-storage"],
)
def test_dispatch_failures_fail_the_stage(prefect_harness, tmp_path: Path, monkeypatch, fake, message) -> None:
    monkeypatch.setattr(pipeline, "run_deployment", fake)
    settings = gpu_settings(tmp_path)

    @pipeline.flow
    def parent() -> None:
        inputs = {"data": settings.stage_dir("teach")}
        pipeline.run_stage("sft", settings, settings.stage_dir("sft"), inputs, lock_holder="holder-1")

    with pytest.raises(MathWizardError, match=message):
        parent()
