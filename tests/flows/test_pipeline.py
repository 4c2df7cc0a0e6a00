"""flows/pipeline.py without a server: parameters, stage order, GPU dispatch (run_deployment faked), the CLI edge."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from pydantic import ValidationError

from flows import pipeline
from flows.pipeline import PipelineParams
from mathwizard.config import gpu_flow, load_settings
from mathwizard.errors import ConfigError, MathWizardError
from mathwizard.manifest import stage_output
from tests.flows.artifacts import table

REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------------ params
def test_params_load_a_shipped_recipe_or_a_file_from_any_directory(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # a worker may start elsewhere: recipes are found in the repository
    settings = PipelineParams(recipe="smoke", home="/data/mw").settings()
    assert (settings.run_name, settings.model.name, settings.home) == ("smoke", "tiny", "/data/mw")
    by_file = PipelineParams(recipe_file="deployments/recipes/smoke.yaml", home="/data/mw").settings()
    assert by_file.model_dump() == settings.model_dump()
    assert PipelineParams().settings() == load_settings()  # no recipe: the embedded defaults
    with pytest.raises(ConfigError, match="not both"):
        PipelineParams(recipe="smoke", recipe_file="deployments/recipes/smoke.yaml").settings()
    with pytest.raises(ValidationError, match="recipe"):
        PipelineParams(recipe="deployments/recipes/smoke.yaml")  # a choice, not a path


def test_typed_fields_and_advanced_values_win_and_empty_keeps_the_recipes() -> None:
    params = PipelineParams(
        recipe="gemma-3n-e2b",
        run_name="try",
        base_model="google/gemma-3n-E2B-it",
        backend="hf",
        sft_max_steps=7,
        dpo_max_steps=3,
        teacher_model="deepseek-chat",
        teacher_base_url="https://api.deepseek.com",
        push=True,
        advanced={"sft": {"lora": {"r": 8}, "max_steps": 99}, "teacher": {"rpm": 60}, "eval": {"limit": None}},
    )
    s = params.settings()
    assert (s.run_name, s.model.name, s.model.backend) == ("try", "google/gemma-3n-E2B-it", "hf")
    assert (s.sft.max_steps, s.dpo.max_steps) == (7, 3)  # the typed field wins over advanced
    assert (s.teacher.model, s.teacher.base_url, s.teacher.rpm) == ("deepseek-chat", "https://api.deepseek.com", 60)
    assert s.publish.push is True and s.sft.lora.r == 8
    assert s.sft.lora.alpha == 16 and s.sft.per_device_train_batch_size == 8  # the recipe's, beside the changes
    assert s.eval.max_new_tokens == 1024  # empty fields keep the recipe's values


def test_a_bad_value_is_one_config_error() -> None:
    with pytest.raises(ValidationError, match="max_step"):
        PipelineParams(advanced={"sft": {"max_step": 7}})  # a typo is refused by the form itself
    # A value of the right type that the settings' own checks refuse: one line naming the field.
    with pytest.raises(ConfigError, match=r"^invalid pipeline parameters: prepare.splits: .*summing to 1"):
        PipelineParams(advanced={"prepare": {"splits": [0.5, 0.5, 0.5]}}).settings()


def test_a_runs_parameters_show_only_what_was_set() -> None:
    params = PipelineParams(recipe="smoke", sft_max_steps=3, advanced={"teacher": {"rpm": 60}})
    assert params.model_dump() == {"recipe": "smoke", "sft_max_steps": 3, "advanced": {"teacher": {"rpm": 60}}}
    assert PipelineParams.model_validate(params.model_dump()) == params


def test_the_command_lines_input(tmp_path: Path) -> None:
    params = PipelineParams.for_command_line(
        REPO / "deployments/recipes/smoke.yaml", home=str(tmp_path), run_name="r", lock_wait_s=5.0
    )
    expected = load_settings(
        REPO / "deployments/recipes/smoke.yaml", home=str(tmp_path), run_name="r", orchestration={"lock_wait_s": 5.0}
    )
    assert params.settings().model_dump() == expected.model_dump()
    assert PipelineParams.for_command_line().settings() == load_settings()


def test_the_run_form_is_one_typed_model(monkeypatch) -> None:
    """What Prefect renders as the Run form: the flow signature's pydantic schema."""
    schema = pipeline.math_wizard.parameters.model_dump()
    assert list(schema["properties"]) == ["params"] and schema["required"] == []  # no competing `settings`
    definitions = schema["definitions"]
    form = definitions["PipelineParams"]["properties"]
    assert list(form) == [
        "recipe", "recipe_file", "run_name", "home", "base_model", "backend", "sft_max_steps", "dpo_max_steps",
        "teacher_model", "teacher_base_url", "push", "advanced",
    ]  # fmt: skip
    recipes = sorted(p.stem for p in (REPO / "deployments" / "recipes").glob("*.yaml"))
    assert definitions["Recipe"]["enum"] == recipes == ["gemma-3n-e2b", "smoke"]
    # Optional fields render as their plain type (a select, a text box), not as a "str | None" switch; an empty
    # field is not sent, and its None keeps the recipe's value.
    assert form["recipe"]["$ref"] == "#/definitions/Recipe" and "anyOf" not in form["recipe"]
    assert (form["backend"]["type"], form["backend"]["enum"]) == ("string", ["auto", "hf", "unsloth"])
    assert "'null'" not in str(schema) and schema["properties"]["params"]["default"] == {}
    advanced = definitions["Advanced"]["properties"]
    assert list(advanced) == ["prepare", "teacher", "model", "sft", "pairs", "dpo", "eval", "publish", "orchestration"]
    sft = definitions["AdvancedSft"]["properties"]
    assert sft["lora"]["$ref"] == "#/definitions/AdvancedSftLoRA"
    assert (sft["max_steps"]["type"], sft["max_steps"]["minimum"]) == ("integer", 1)  # the settings' limits too
    assert schema == pipeline.data_only.parameters.model_dump()  # one form for both pipeline flows

    # The UI renders descriptions as HTML: `<home>` would vanish. None of the form's descriptions has a bracket.
    def descriptions(node):
        if isinstance(node, dict):
            if isinstance(node.get("description"), str):
                yield node["description"]
            for value in node.values():
                yield from descriptions(value)
        elif isinstance(node, list):
            for value in node:
                yield from descriptions(value)

    found = list(descriptions(schema))
    assert len(found) > 100 and not [d for d in found if "<" in d or ">" in d]
    assert "Default: {namespace}/math-wizard-gemma-3n-dpo." in found  # was <namespace>


def test_gpu_deployments_must_name_each_stages_gpu_flow() -> None:
    from flows import gpu

    names = {s: getattr(gpu, f"{s}_on_worker").name for s in ("sft", "pairs", "dpo", "eval")}
    assert names == {s: gpu_flow(s) for s in names} == {s: f"math-wizard-gpu-{s}" for s in names}
    with pytest.raises(ConfigError, match=r"must name each stage's GPU flow \(sft: math-wizard-gpu-sft/...\)"):
        load_settings(orchestration={"gpu_deployments": {"sft": "math-wizard-gpu-dpo/dpo-on-cuda"}})


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
    result = pipeline.math_wizard(PipelineParams(home=str(tmp_path), run_name="r"))

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


def test_data_only_runs_prepare_then_teach(prefect_harness, tmp_path: Path, monkeypatch) -> None:
    calls: list[str] = []

    def fake_flow(stage: str):
        def run(settings, out: str, **inputs: Any) -> dict[str, Any]:
            calls.append(stage)
            return {"stage": stage, "fingerprint": stage * 4, "report": {}, "seconds": 1.0}

        return run

    monkeypatch.setattr(pipeline, "stage_flow", fake_flow)
    monkeypatch.setattr(pipeline, "report_of", lambda stage, manifest: SimpleNamespace(summary=lambda: stage))
    result = pipeline.data_only(PipelineParams(home=str(tmp_path)))
    assert calls == ["prepare", "teach"] and list(result) == ["prepare", "teach"]


def test_summary_is_each_stages_report_in_one_line(prefect_harness, tmp_path: Path) -> None:
    from mathwizard.stages import prepare, publish
    from mathwizard.stages.publish import NOT_UPLOADED

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
        "publish": {"fingerprint": "b" * 12, "seconds": 0.5, "summary": f"0 repos written under /r ({NOT_UPLOADED})"},
    }
    rows = table("pipeline-stages")
    assert [r["stage"] for r in rows] == ["prepare", "publish"] and rows[1]["ran on"] == "this flow run"
    assert rows[0]["summary"] == "60 of 60 rows kept (train 51 · val 4 · test 5), 0 quarantined"


def test_every_stage_has_its_flow_in_pipeline_order() -> None:
    from mathwizard.config import STAGE_DIRS

    names = {stage: pipeline.stage_flow(stage).name for stage in STAGE_DIRS}
    assert names == {stage: f"math-wizard-{stage}" for stage in STAGE_DIRS}  # each flow is named after its stage
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
        orchestration={
            "gpu_deployments": {"sft": "math-wizard-gpu-sft/sft-on-cuda"},
            "poll_seconds": 1,
            "scratch": "/here",
        },
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
    assert call["name"] == "math-wizard-gpu-sft/sft-on-cuda" and call["poll_interval"] == 1
    sent = call["parameters"]
    assert sent["out"] == settings.stage_dir("sft") and sent["inputs"] == {"data": settings.stage_dir("teach")}
    assert "scratch" not in sent["settings"]["orchestration"]  # the worker's own scratch folder applies there
    assert sent["settings"]["home"] == str(tmp_path)
    assert sent["lock_holder"] == "holder-1"  # the worker's stage joins the pipeline's run-folder lock
    assert manifest["fingerprint"] == "f" * 64  # read back from the stage folder, not from Prefect's result


def test_gpu_stages_run_here_when_dispatch_is_off(prefect_harness, tmp_path: Path, monkeypatch) -> None:
    """One GPU machine: the recipe keeps its gpu_deployments and the stage runs in the pipeline's process."""
    fake = FakeDeployments()
    monkeypatch.setattr(pipeline, "run_deployment", fake)
    ran: list[str] = []

    def run_here(stage: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
        ran.append(stage)
        return {"fingerprint": "e" * 64}

    monkeypatch.setattr(pipeline, "run_on_storage", run_here)
    settings = gpu_settings(tmp_path)
    settings = settings.model_copy(
        update={"orchestration": settings.orchestration.model_copy(update={"dispatch_gpu_stages": False})}
    )

    @pipeline.flow
    def parent() -> dict[str, Any]:
        inputs = {"data": settings.stage_dir("teach")}
        return pipeline.run_stage("sft", settings, settings.stage_dir("sft"), inputs, lock_holder="holder-1")

    manifest = parent()
    assert ran == ["sft"] and fake.calls == [] and manifest["where"] == "this flow run"


def test_dispatch_can_be_switched_off_from_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("MATHWIZARD_ORCHESTRATION__DISPATCH_GPU_STAGES", "false")
    settings = load_settings(REPO / "deployments" / "recipes" / "gemma-3n-e2b.yaml")
    assert settings.orchestration.gpu_deployments and not settings.orchestration.dispatch_gpu_stages


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
