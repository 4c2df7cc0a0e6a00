"""The command line: commands in pipeline order with help for each, one meaning per flag, every stage command's
flags reaching the stage flow (patched) exactly, its one-line summary, and errors as one red line.

Stage commands call `flows.pipeline.stage_flow(stage)(settings=..., **inputs)`; most tests here replace that flow
with a recorder. A few run the real flows (under the session's Prefect test API) where the CLI's behaviour depends
on them: a stage's own validation error reaching the user as one line, and prepare/teach/publish end to end.
"""

from __future__ import annotations

import json
import re
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import pytest
import typer
from pydantic import BaseModel
from typer.testing import CliRunner

from mathwizard.cli import app, console, handles_errors
from mathwizard.config import STAGE_DIRS, Settings
from mathwizard.errors import DataError
from mathwizard.stages import stage_module
from tests.cli_runner import invoke

runner = CliRunner()
REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "data"
FP = "0123456789abcdef" * 4


@pytest.fixture(autouse=True)
def _environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """A wide terminal, so rich does not wrap a long path inside a line the test reads; and the Prefect defaults
    the CLI sets with os.environ.setdefault undone after each test.

    The CLI's console fixed its width at import (200 when not a terminal), so COLUMNS alone does not reach it: widen
    it as well. Two tmp paths on one line pass 200 characters under pytest-xdist (`.../popen-gw1/...`)."""
    monkeypatch.setenv("COLUMNS", "240")
    monkeypatch.setattr(console, "width", 1000)
    for name in ("PREFECT_LOGGING_EXTRA_LOGGERS", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"):
        monkeypatch.delenv(name, raising=False)


# ------------------------------------------------------------------------------------------- the commands
def _commands(group: typer.Typer, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = [(*prefix, c.name or c.callback.__name__) for c in group.registered_commands]
    for sub in group.registered_groups:
        found += _commands(sub.typer_instance, (*prefix, sub.name))
    return found


@pytest.mark.parametrize("command", _commands(app), ids=" ".join)
def test_every_subcommand_has_help(command: tuple[str, ...]) -> None:
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_commands_are_listed_in_pipeline_order() -> None:
    assert _commands(app) == [
        ("run",),
        *((stage,) for stage in STAGE_DIRS),  # prepare, teach, sft, pairs, dpo, eval, publish
        ("ask",),
        ("config",),
        ("up",),
        ("model", "tiny"),
        ("model", "random-e2b"),
    ]
    listed = re.findall(r"^│ (\w[\w-]*) ", runner.invoke(app, ["--help"]).output, flags=re.MULTILINE)
    assert listed == ["run", *STAGE_DIRS, "ask", "config", "up", "model"]  # what --help shows, in that order


@pytest.mark.parametrize(
    ("command", "old", "new"),
    [
        ("sft", "--model", "--base-model"),
        ("pairs", "--model", "--sft"),
        ("dpo", "--model", "--sft"),
        ("teach", "--model", "--teacher-model"),
    ],
)
def test_one_meaning_per_flag(command: str, old: str, new: str) -> None:
    result = runner.invoke(app, [command, old, "x"])
    assert result.exit_code == 2 and "No such option" in result.output  # --model means "the model to run"
    assert new in runner.invoke(app, [command, "--help"]).output


def test_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.startswith("mathwizard ")


def test_config_prints_effective_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MATHWIZARD_DPO__BETA", "0.3")
    result = runner.invoke(app, ["config", "--run-name", "exp1"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["dpo"]["beta"] == 0.3 and data["run_name"] == "exp1"


def test_invalid_setting_is_one_line_without_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MATHWIZARD_SFT__MAX_STEPS", "-1")
    result = runner.invoke(app, ["config"])
    assert result.exit_code == 1
    assert "sft.max_steps" in result.output and "Traceback" not in result.output


def test_library_errors_become_exit_code_1() -> None:
    @handles_errors
    def boom() -> None:
        raise DataError("data/x.parquet is empty; run `mathwizard prepare` first")

    with pytest.raises(typer.Exit) as info:
        boom()
    assert info.value.exit_code == 1


# ----------------------------------------------------------------------------- stage commands, flow patched
def example(model: type[BaseModel]) -> BaseModel:
    """A valid instance of a stage's report: every required field a plain value of its type."""
    return model(**{name: _value(f.annotation) for name, f in model.model_fields.items() if f.is_required()})


def _value(annotation: Any) -> Any:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (Union, types.UnionType):
        return None if type(None) in args else _value(args[0])
    if origin is Literal:
        return args[0]
    if origin in (dict, list, tuple, set):
        return origin()
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return example(annotation)
    return {int: 3, float: 0.25, str: "x", bool: False}[annotation]


class FakeFlows:
    """Stands in for `flows.pipeline.stage_flow`: records each stage flow call and returns a finished manifest."""

    def __init__(self, reports: dict[str, BaseModel] | None = None) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.reports = reports or {}

    def __call__(self, stage: str):
        def flow(**kwargs: Any) -> dict[str, Any]:
            self.calls.append((stage, kwargs))
            report = self.reports.get(stage) or example(stage_module(stage).Report)
            return {"stage": stage, "fingerprint": FP, "seconds": 12.5, "report": report.model_dump(mode="json")}

        return flow

    @property
    def call(self) -> tuple[Settings, dict[str, Any]]:
        """The one call's settings and the other keyword arguments."""
        [(_, kwargs)] = self.calls
        kwargs = dict(kwargs)
        return kwargs.pop("settings"), kwargs


@pytest.fixture
def flows(monkeypatch: pytest.MonkeyPatch, prefect_harness: None) -> FakeFlows:
    """The stage flows replaced by a recorder; the session's Prefect API stands in for the CLI's own server."""
    import flows.pipeline

    fake = FakeFlows()
    monkeypatch.setattr(flows.pipeline, "stage_flow", fake)
    return fake


def _printed(result) -> str:
    return " ".join(result.output.split())  # rich wraps long lines


def test_prepare_flags_reach_the_flow(flows: FakeFlows, tmp_path: Path) -> None:
    from mathwizard.stages.prepare import Report

    flows.reports["prepare"] = Report(
        source="local", resolved_revision=None, rows_in=10, kept=8, quarantined=2, resized=0,
        quarantine_reasons={"missing_image": 2}, splits={"train": 6, "val": 1, "test": 1}, workers=1,
    )  # fmt: skip
    args = [
        "prepare", "--source", "local", "--jsonl", str(FIXTURES / "mm_math_mini.jsonl"),
        "--images", str(FIXTURES / "images"), "--out", str(tmp_path / "prep"), "--max-image-size", "256",
        "--splits", "0.8,0.1,0.1", "--limit", "5", "--workers", "1", "--home", str(tmp_path), "--run-name", "r1",
    ]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    settings, inputs = flows.call
    assert inputs == {"out": str(tmp_path / "prep")}
    cfg = settings.prepare
    assert (cfg.source, cfg.jsonl, cfg.images) == (
        "local",
        str(FIXTURES / "mm_math_mini.jsonl"),
        str(FIXTURES / "images"),
    )
    assert (cfg.max_image_size, cfg.splits, cfg.limit, cfg.workers) == (256, (0.8, 0.1, 0.1), 5, 1)
    assert (settings.home, settings.run_name) == (str(tmp_path), "r1")
    lines = result.output.splitlines()
    assert lines[0] == "prepare: 8 of 10 rows kept (train 6 · val 1 · test 1), 2 quarantined"
    assert lines[1] == f"{tmp_path / 'prep'} · 12.5 s · fingerprint {FP[:12]}"


def test_defaults_come_from_settings(flows: FakeFlows, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MATHWIZARD_PREPARE__MAX_IMAGE_SIZE", "300")
    result = runner.invoke(app, ["prepare", "--home", str(tmp_path)])
    assert result.exit_code == 0, result.output
    settings, inputs = flows.call
    assert inputs == {}  # every input left to the flow's defaults: the run's folders
    assert (settings.prepare.source, settings.prepare.max_image_size, settings.prepare.splits) == (
        "sample",
        300,
        (0.9, 0.05, 0.05),
    )
    assert f"{tmp_path}/runs/default/01-prepare · 12.5 s" in result.output  # the folder the flow wrote


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--splits", "0.5,0.5,0.5"], "splits must be three non-negative fractions summing to 1"),
        (["--splits", "ninety,five,five"], "splits must be three numbers"),
        (["--source", "kaggle"], "prepare.source"),
        (["--max-image-size", "4"], "prepare.max_image_size"),
        (["--teacher", "gpt"], "teacher.kind"),
        (["--fallback", "maybe"], "pairs.fallback"),
        (["--beta", "0"], "dpo.beta"),
    ],
)
def test_invalid_settings_stop_before_the_flow(flows: FakeFlows, args: list[str], message: str) -> None:
    command = {"--teacher": "teach", "--fallback": "pairs", "--beta": "dpo"}.get(args[0], "prepare")
    result = runner.invoke(app, [command, *args])
    assert result.exit_code == 1, result.output
    assert message in result.output
    assert "Traceback" not in result.output and result.output.count("error:") == 1
    assert flows.calls == []  # nothing started


def test_teach_flags_reach_the_flow(flows: FakeFlows, tmp_path: Path) -> None:
    from mathwizard.stages.teach import Report, SplitCounts

    flows.reports["teach"] = Report(
        teacher="openai", model="m", host="h", prompt_version="v1", items=5, written=2, failed=3, cache_hits=1,
        api_calls=4, retries=0, prompt_tokens=10, completion_tokens=20, seconds=1.0,
        failures_by_reason={"answer_mismatch": 2, "timeout": 1},
        splits={"val": SplitCounts(items=5, written=2, failed=3)},
    )  # fmt: skip
    args = ["teach", "--home", str(tmp_path), "--data", "in", "--out", "o", "--split", "val", "--teacher", "rule"]
    args += ["--base-url", "http://h:1/v1", "--teacher-model", "m", "--concurrency", "3", "--rpm", "7", "--tpm", "9000"]
    result = runner.invoke(app, [*args, "--limit", "5", "--retry-failed", "--mode", "batch"])
    assert result.exit_code == 0, result.output
    settings, inputs = flows.call
    assert inputs == {"data": "in", "out": "o"}
    cfg = settings.teacher
    assert (cfg.split, cfg.kind, cfg.base_url, cfg.model) == ("val", "rule", "http://h:1/v1", "m")
    assert (cfg.concurrency, cfg.rpm, cfg.tpm, cfg.limit, cfg.retry_failed, cfg.mode) == (3, 7, 9000, 5, True, "batch")
    printed = _printed(result)
    assert "teach: 2 of 5 items written by m, 3 failed; 4 API calls, 1 cache hits" in printed
    assert "excluded 3 (answer_mismatch 2, timeout 1): o/failures.jsonl" in printed


def test_sft_flags_reach_the_flow(flows: FakeFlows, tmp_path: Path) -> None:
    args = ["sft", "--home", str(tmp_path), "--data", "d", "--out", "o", "--base-model", "org/base", "--backend", "hf"]
    args += ["--max-steps", "7", "--batch-size", "3", "--grad-accum", "2", "--learning-rate", "0.001"]
    args += ["--max-length", "1024", "--save-steps", "5", "--save-merged", "--limit", "9"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    settings, inputs = flows.call
    assert inputs == {"data": "d", "out": "o"}
    assert (settings.model.name, settings.model.backend) == ("org/base", "hf")
    cfg = settings.sft
    assert (cfg.max_steps, cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps) == (7, 3, 2)
    assert (cfg.learning_rate, cfg.max_length, cfg.save_steps, cfg.save_merged, cfg.limit) == (1e-3, 1024, 5, True, 9)
    assert result.output.startswith(f"sft: {example(stage_module('sft').Report).summary()}\n")


def test_pairs_flags_reach_the_flow(flows: FakeFlows, tmp_path: Path) -> None:
    args = ["pairs", "--home", str(tmp_path), "--sft", "s", "--data", "d", "--out", "o", "--backend", "hf"]
    args += ["--temperature", "0.7", "--top-p", "0.9", "--max-new-tokens", "99", "--max-attempts", "5"]
    args += ["--fallback", "none", "--batch-size", "3", "--chunk-size", "7", "--limit", "11"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    settings, inputs = flows.call
    assert inputs == {"sft": "s", "data": "d", "out": "o"}
    cfg = settings.pairs
    assert settings.model.backend == "hf"
    assert (cfg.temperature, cfg.top_p, cfg.max_new_tokens, cfg.max_attempts) == (0.7, 0.9, 99, 5)
    assert (cfg.fallback, cfg.batch_size, cfg.chunk_size, cfg.limit) == ("none", 3, 7, 11)
    assert result.output.startswith(f"pairs: {example(stage_module('pairs').Report).summary()}\n")


def test_dpo_flags_reach_the_flow(flows: FakeFlows, tmp_path: Path) -> None:
    args = ["dpo", "--home", str(tmp_path), "--sft", "s", "--pairs", "p", "--out", "o", "--backend", "hf"]
    args += ["--beta", "0.2", "--max-steps", "4", "--batch-size", "1", "--grad-accum", "8", "--no-save-merged"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    settings, inputs = flows.call
    assert inputs == {"sft": "s", "pairs": "p", "out": "o"}
    cfg = settings.dpo
    assert (cfg.beta, cfg.max_steps, cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps) == (0.2, 4, 1, 8)
    assert cfg.save_merged is False and settings.model.backend == "hf"
    assert result.output.startswith(f"dpo: {example(stage_module('dpo').Report).summary()}\n")


def test_eval_flags_reach_the_flow(flows: FakeFlows, tmp_path: Path) -> None:
    from mathwizard.stages.evaluate import Report, Score

    flows.reports["eval"] = Report(
        label="dpo", n=10, accuracy=0.25, format_rate=0.9, by_difficulty={"easy": Score(n=4, accuracy=0.5)},
        generated_tokens=100, max_new_tokens=64, split="test", items=10, no_reference=0, seconds=2.0,
        model_location="m",
    )  # fmt: skip
    args = ["eval", "--home", str(tmp_path), "--model", "m", "--label", "dpo", "--data", "d", "--out", "o"]
    result = runner.invoke(app, [*args, "--limit", "7", "--batch-size", "2", "--max-new-tokens", "50"])
    assert result.exit_code == 0, result.output
    settings, inputs = flows.call
    assert inputs == {"model": "m", "data": "d", "label": "dpo", "out": "o"}
    assert (settings.eval.limit, settings.eval.batch_size, settings.eval.max_new_tokens) == (7, 2, 50)
    assert result.output.splitlines()[0] == "eval (dpo): accuracy 25.0% on 10 problems, format 90.0% (easy 50.0%)"


def test_eval_defaults_to_the_labels_folder(flows: FakeFlows, tmp_path: Path) -> None:
    result = runner.invoke(app, ["eval", "--home", str(tmp_path)])
    assert result.exit_code == 0, result.output
    _, inputs = flows.call
    assert inputs == {"label": "sft"}  # the flow picks the model and data; the label is always passed
    assert f"{tmp_path}/runs/default/06-eval/sft · 12.5 s" in result.output


def test_publish_flags_reach_the_flow(flows: FakeFlows, tmp_path: Path) -> None:
    from mathwizard.stages.publish import Repo, Report

    repo = Repo(
        part="model", repo_id="acme/m", repo_type="model", private=False, folder="models/acme/m", files=["README.md"],
        url="http://hub/acme/m", commit="abcdef123456789",
    )  # fmt: skip
    flows.reports["publish"] = Report(destination="hub", endpoint="http://hub", root="/r", repos=[repo])
    args = ["publish", "--home", str(tmp_path), "--run-name", "r1", "--run-dir", "some/run", "--namespace", "acme"]
    args += ["--public", "--require-improvement", "--endpoint", "http://127.0.0.1:5", "--target", "t", "--push"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    settings, inputs = flows.call
    assert inputs == {"run_dir": "some/run"}
    cfg = settings.publish
    assert (cfg.push, cfg.namespace, cfg.private, cfg.require_improvement) == (True, "acme", False, True)
    assert (cfg.endpoint, cfg.target, cfg.push_merged) == ("http://127.0.0.1:5", "t", False)
    assert settings.run_name == "r1"
    assert result.output.splitlines()[0] == "publish: 1 repos on http://hub: http://hub/acme/m"


def test_run_prints_one_line_per_stage(monkeypatch: pytest.MonkeyPatch, prefect_harness: None, tmp_path: Path) -> None:
    import flows.pipeline

    seen: dict[str, Any] = {}

    def fake(params):
        seen["settings"] = params.settings()  # the flow's own input, from which it derives its settings
        return {
            "prepare": {"fingerprint": "abc", "seconds": 1.0, "summary": "60 of 60 rows kept"},
            "eval-sft": {"fingerprint": "def", "seconds": 22.25, "summary": "accuracy 40.0% on 5 problems"},
        }

    monkeypatch.setattr(flows.pipeline, "math_wizard", fake)
    args = ["run", "--config", str(REPO / "deployments/recipes/smoke.yaml"), "--home", str(tmp_path)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert seen["settings"].run_name == "smoke" and seen["settings"].home == str(tmp_path)
    lines = [" ".join(line.split()) for line in result.output.splitlines() if line.strip()]
    run_dir = f"{tmp_path}/runs/smoke"
    assert lines[:3] == [
        "stage seconds result",
        "✓ prepare 1.0 60 of 60 rows kept",
        "✓ eval-sft 22.2 accuracy 40.0% on 5 problems",
    ]
    # then where the model is and how to try it (no publish folder in this fake run, no prepared figure)
    assert lines[3:] == [
        f"model {run_dir}/05-dpo/adapter (SFT: {run_dir}/03-sft/adapter)",
        f'try it mathwizard ask --model {run_dir}/05-dpo --image figure.png "What is the measure of the marked angle?"',
        run_dir,
    ]


def test_up_command_starts_the_stack_and_stops_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from deployments import localstack

    events: list[str] = []

    class FakeStack:
        ui_url, api_url, logs = "http://127.0.0.1:4300", "http://127.0.0.1:4300/api", tmp_path

        def __init__(self) -> None:
            self.server = types.SimpleNamespace(poll=lambda: events.append("poll") or 0)  # the server "exits" at once

        def stop(self) -> None:
            events.append("stop")

    def fake_up(home, **kwargs):
        events.append("up")
        assert kwargs["port"] == 4300 and kwargs["cuda_worker"] is False
        assert kwargs["schedules"] is False  # deployed off unless --schedules
        assert kwargs["env"] == {"MATHWIZARD_HOME": str(tmp_path.resolve())}  # no result storage to configure
        assert Path(home) == tmp_path.resolve() / "prefect"
        return FakeStack()

    monkeypatch.setattr(localstack, "up", fake_up)
    result = runner.invoke(app, ["up", "--home", str(tmp_path), "--port", "4300", "--no-cuda"])
    assert result.exit_code == 0, result.output
    assert events == ["up", "poll", "stop"]
    assert "http://127.0.0.1:4300" in result.output


# -------------------------------------------------------------------------------- real flows, real stages
def _one_error_line(result) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and result.output.count("error:") == 1
    return _printed(result)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["prepare", "--source", "local"], "source=local needs --jsonl"),
        (["prepare", "--source", "local", "--jsonl", "nope.jsonl", "--images", "."], "nope.jsonl does not exist"),
        (["prepare", "--source", "local", "--jsonl", str(FIXTURES / "mm_math_mini.jsonl")], "needs --images"),
        (["prepare", "--source", "hub"], "HF_HUB_OFFLINE is set"),
        (["teach", "--teacher", "openai", "--data", "{prepared}"], "teacher.kind=openai needs an API key"),
        (["teach"], "01-prepare has no manifest.json: it is not a finished stage folder; run `mathwizard prepare`"),
        (["eval", "--label", "sft", "--data", "{data}"], "03-sft does not exist"),
    ],
    ids=["no-jsonl", "missing-jsonl", "no-images", "hub-offline", "no-key", "no-upstream", "no-sft-model"],
)
def test_a_stages_own_check_is_one_red_line(
    prefect_harness: None,
    prepared: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
    message: str,
) -> None:
    """The CLI does not pre-validate inputs: the stage does, inside its flow, and the user sees one line."""
    from tests.stages.eval_data import make_data

    monkeypatch.delenv("MATHWIZARD_TEACHER_API_KEY", raising=False)
    folders = {"{prepared}": lambda: prepared, "{data}": lambda: make_data(tmp_path / "02-teach")}
    args = [str(folders[a]()) if a in folders else a for a in args]
    result = invoke([*args, "--home", str(tmp_path)])
    assert message in _one_error_line(result)
    assert not (tmp_path / "runs" / "default" / "03-sft").exists()


def test_a_damaged_teacher_cache_is_one_red_line(prefect_harness: None, prepared: Path, server, tmp_path: Path) -> None:
    cache = tmp_path / "cache" / "teacher.sqlite"
    cache.parent.mkdir()
    cache.write_bytes(b"a disk error turned this into noise " * 100)
    args = ["teach", "--home", str(tmp_path), "--data", str(prepared), "--teacher", "openai"]
    result = invoke([*args, "--base-url", server.base_url, "--teacher-model", "test-teacher"])
    assert _one_error_line(result) == (
        f"error: the teacher cache {cache} is damaged (file is not a database); delete it (with its -wal and -shm"
        " files, if any) and re-run: only the replies it held are asked again"
    )
    assert server.requests == 0


def test_backend_unsloth_without_cuda_is_one_line(prefect_harness: None, tmp_path: Path) -> None:
    import torch

    from tests.training.builders import teach_folder

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    teach = teach_folder(tmp_path / "02-teach", n_train=2, n_val=0)
    args = ["sft", "--home", str(tmp_path), "--data", str(teach), "--out", str(tmp_path / "o"), "--backend", "unsloth"]
    result = invoke(args)
    assert _one_error_line(result) == (
        "error: --backend unsloth needs a CUDA GPU and none is visible; use --backend hf (or auto)"
    )


def test_prepare_end_to_end_on_the_sample(prefect_harness: None, tmp_path: Path) -> None:
    args = ["prepare", "--source", "sample", "--home", str(tmp_path), "--workers", "2"]
    result = invoke(args)
    assert result.exit_code == 0, result.output
    # 60 bundled problems -> 51 / 4 / 5 (see tests/stages/test_prepare.py)
    assert result.output.startswith("prepare: 60 of 60 rows kept (train 51 · val 4 · test 5), 0 quarantined\n")
    out = tmp_path / "runs" / "default" / "01-prepare"
    assert {p.name for p in out.iterdir()} >= {
        "train-00000-of-00001.parquet", "val-00000-of-00001.parquet", "test-00000-of-00001.parquet",
        "quarantine.jsonl", "manifest.json",
    }  # fmt: skip
    manifest_before = (out / "manifest.json").read_text()
    fingerprint = json.loads(manifest_before)["fingerprint"]
    assert f"{out} · " in _printed(result) and f"fingerprint {fingerprint[:12]}" in _printed(result)
    again = invoke(args)
    assert again.exit_code == 0 and again.output.startswith("prepare: 60 of 60 rows kept")
    assert (out / "manifest.json").read_text() == manifest_before  # skipped: nothing rewritten


def test_teach_against_the_server_under_faults(prefect_harness: None, prepared: Path, server, tmp_path: Path) -> None:
    server.configure(faults={"503": 0.1, "drop": 0.05, "wrong_answer": 0.1}, seed=5)
    out = tmp_path / "taught"
    args = ["teach", "--home", str(tmp_path), "--data", str(prepared), "--out", str(out), "--teacher", "openai"]
    args += ["--base-url", server.base_url, "--teacher-model", "test-teacher", "--concurrency", "4", "--rpm", "60000"]
    # Six asks an item: with 3 (the default) one of the 60 items drew three wrong answers in about one run in 16.
    env = {"MATHWIZARD_TEACHER__BACKOFF_S": "0.005", "MATHWIZARD_TEACHER__MAX_ATTEMPTS": "6"}
    result = runner.invoke(app, args, env=env)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["written"] == 60
    expected = f"teach: 60 of 60 items written by test-teacher, 0 failed; {report['api_calls']} API calls, 0 cache hits"
    # off a terminal the live display is one line per finished loop, then the stage's summary
    assert _printed(result).startswith(f"✓ teach (all): items done: 60 of 60 {expected}")


def test_teach_in_batch_mode_against_the_server(prefect_harness: None, prepared: Path, server, tmp_path: Path) -> None:
    """`mathwizard teach --teacher openai --mode batch`: the rows online mode writes, through one batch."""
    import pyarrow.parquet as pq

    base = ["teach", "--data", str(prepared), "--teacher", "openai"]
    base += ["--base-url", server.base_url, "--teacher-model", "test-teacher"]
    env = {"MATHWIZARD_TEACHER__BATCH_POLL_S": "0.005", "MATHWIZARD_TEACHER__BATCH_POLL_MAX_S": "0.01"}
    homes = {mode: ["--home", str(tmp_path / mode), "--out", str(tmp_path / mode)] for mode in ("batch", "online")}
    batch = runner.invoke(app, [*base, *homes["batch"], "--mode", "batch"], env=env)
    assert batch.exit_code == 0, batch.output
    report = json.loads((tmp_path / "batch" / "report.json").read_text())
    assert (report["mode"], report["written"], report["api_calls"], len(report["batch_ids"])) == ("batch", 60, 0, 1)
    assert "60 batch requests in 1 batches" in _printed(batch)
    assert server.calls["files.create"] == server.calls["batches.create"] == 1
    online = runner.invoke(app, [*base, *homes["online"], "--mode", "online"], env=env)  # a cache of its own
    assert online.exit_code == 0, online.output
    assert server.billed["online_requests"] == server.billed["batch_requests"] == 60
    for split in ("train", "val", "test"):
        got = [
            pq.read_table(tmp_path / mode / f"{split}.parquet").select(["id", "solution"])
            for mode in ("batch", "online")
        ]
        assert got[0].to_pylist() == got[1].to_pylist()


def test_publish_end_to_end_offline_and_its_gate(
    prefect_harness: None, run_dir: Path, tmp_path: Path, no_hub_login: None
) -> None:
    from tests.publish.synthetic import make_run

    home = tmp_path / "home"
    result = invoke(["publish", "--home", str(home), "--run-dir", str(run_dir)])
    assert result.exit_code == 0, result.output
    out = home / "runs" / "default" / "07-publish"
    assert result.output.startswith(f"publish: 3 repos written under {out} (not uploaded: publish.push is false)")
    assert (out / "datasets" / "math-wizard" / "math-wizard-sft").is_dir()

    worse = make_run(tmp_path / "worse", accuracies={"sft": 0.4, "dpo": 0.35})
    refused = invoke(["publish", "--home", str(home), "--run-dir", str(worse), "--require-improvement"])
    assert "DPO accuracy 0.350 is below SFT accuracy 0.400" in _one_error_line(refused)
