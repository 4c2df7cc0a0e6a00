"""The `mathwizard` command line: turns flags into settings, runs the flows and prints what they did.

Usage: `mathwizard run` (whole pipeline on embedded defaults), `mathwizard prepare --source sample`, ...
Commands are listed in pipeline order. A flag means the same thing in every command: `--data` is the input stage
folder, `--out` the output folder, `--model` the model to run (eval, ask), `--base-model` the model SFT starts from,
`--sft` the SFT stage folder pairs and DPO build on, `--teacher-model` the teacher API's model.
Flows are imported inside the commands, so `mathwizard --help` starts fast. The stages validate their own inputs:
a bad input is one red line from the stage, whichever way it is started.
"""

from __future__ import annotations

import contextlib
import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from pydantic import BaseModel
from rich.console import Console

from mathwizard import __version__
from mathwizard.config import (
    DPOConfig,
    EvalConfig,
    ModelConfig,
    PairsConfig,
    PrepareConfig,
    PublishConfig,
    Settings,
    SFTConfig,
    TeacherConfig,
    load_settings,
)
from mathwizard.errors import MathWizardError

app = typer.Typer(
    name="mathwizard",
    help="Turn MM_Math into a multimodal math tutor: prepare → teach → sft → pairs → dpo → eval → publish.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
# Piped to a file (CI logs), lines are not cut at 80 columns.
console = Console(stderr=True, width=None if sys.stderr.isatty() else 200)
F = TypeVar("F", bound=Callable[..., Any])


def setting(model: type[BaseModel], name: str, *flags: str, default: bool = True, **kwargs: Any) -> Any:
    """A typer option whose help is the settings field's description (and default): --help and the config agree."""
    field = model.model_fields[name]
    value = field.get_default(call_default_factory=True)
    shown = f" (default: {value})" if default and value is not None and not isinstance(value, list | dict) else ""
    return typer.Option(*flags, help=f"{field.description}{shown}", **kwargs)


# Options every command shares.
ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="YAML settings file, e.g. deployments/recipes/smoke.yaml.")
]
HomeOpt = Annotated[str | None, typer.Option("--home", help="Artifact root folder or URL (MATHWIZARD_HOME).")]
RunNameOpt = Annotated[str | None, typer.Option("--run-name", help="Run folder under <home>/runs (default: default).")]
OutOpt = Annotated[Path | None, typer.Option("--out", help="Output folder (default: the run's folder of the stage).")]
WaitOpt = Annotated[
    float | None,
    typer.Option("--wait", help="Seconds to wait while another run writes the run folder (default: stop at once)."),
]
BackendOpt = Annotated[str | None, setting(ModelConfig, "backend", "--backend", metavar="auto|hf|unsloth")]
# Training options (sft, dpo): the defaults differ per stage (`mathwizard config` shows them).
MaxStepsOpt = Annotated[int | None, setting(SFTConfig, "max_steps", "--max-steps", default=False)]
BatchOpt = Annotated[int | None, setting(SFTConfig, "per_device_train_batch_size", "--batch-size", default=False)]
AccumOpt = Annotated[int | None, setting(SFTConfig, "gradient_accumulation_steps", "--grad-accum", default=False)]
LrOpt = Annotated[float | None, setting(SFTConfig, "learning_rate", "--learning-rate", default=False)]
MaxLengthOpt = Annotated[int | None, setting(SFTConfig, "max_length", "--max-length", default=False)]
SaveStepsOpt = Annotated[int | None, setting(SFTConfig, "save_steps", "--save-steps", default=False)]
MergedOpt = Annotated[bool | None, setting(SFTConfig, "save_merged", "--save-merged/--no-save-merged", default=False)]
TrainLimitOpt = Annotated[int | None, setting(SFTConfig, "limit", "--limit", default=False)]


def handles_errors(fn: F) -> F:
    """User errors become one red line and exit code 1, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except MathWizardError as exc:
            console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(code=1) from None
        except KeyboardInterrupt:
            console.print("[yellow]interrupted[/]; re-run the same command to resume where it stopped")
            raise typer.Exit(code=130) from None

    return wrapper  # type: ignore[return-value]


def load(
    config: Path | None,
    home: str | None = None,
    run_name: str | None = None,
    wait: float | None = None,
    **overrides: Any,
) -> Settings:
    """Settings from the file, env and flags, with Prefect set up for this machine."""
    overrides.setdefault("orchestration", {})["lock_wait_s"] = wait
    return load_settings(config, home=home, run_name=run_name, **overrides)


def run_flow(settings: Settings, call: Callable[[Any], dict[str, Any]], *, lock: bool = True) -> dict[str, Any]:
    """`call(flows.pipeline)` under the run folder's lock, with this process's own Prefect API and a live display.

    The lock comes first, so a busy run folder is one line before anything starts.
    """
    from mathwizard.cli.display import live_progress
    from mathwizard.cli.runtime import prefect_api, quiet_prefect_console

    with run_folder_lock(settings) if lock else contextlib.nullcontext(), prefect_api(_pipeline) as pipeline:
        quiet_prefect_console()
        with live_progress(console):
            return call(pipeline)


def run_folder_lock(settings: Settings) -> contextlib.AbstractContextManager[str]:
    """The run folder's lock (`mathwizard.lock`), taken before Prefect starts, so a busy folder is one line at once."""
    from mathwizard.lock import run_lock

    orchestration = settings.orchestration
    return run_lock(settings.run_dir, wait_s=orchestration.lock_wait_s, storage_options=orchestration.storage_options)


def _from_checkout(module: str) -> Any:
    """A module of the source checkout (flows/, tasks/, deployments/), or one line saying why it is missing."""
    import importlib

    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name not in ("flows", "tasks", "deployments"):
            raise
        raise MathWizardError(
            "the Prefect flows live in the Math Wizard source checkout, not in the wheel; clone the repository and"
            " install it with scripts/setup.sh (an editable install puts flows/, tasks/ and deployments/ on the path)"
        ) from None


def _pipeline() -> Any:
    return _from_checkout("flows.pipeline")


def run_stage(stage: str, settings: Settings, out: Path | None, **inputs: Path | str | None) -> dict[str, Any]:
    """Run one stage's flow on `settings` and print its summary; inputs left None default to the run's folders.

    Writing into the run folder (no `--out`) takes the run folder's lock first, so two commands never write it at once.

    Returns:
        The stage's manifest as a dict.
    """
    from mathwizard.stages import report_of

    given = {name: str(value) for name, value in {**inputs, "out": out}.items() if value is not None}
    manifest = run_flow(
        settings, lambda pipeline: pipeline.stage_flow(stage)(settings=settings, **given), lock=out is None
    )
    label = given.get("label")
    name = f"{stage} ({label})" if label else stage
    console.print(f"[bold green]{name}[/]: {report_of(stage, manifest).summary()}", highlight=False)
    folder = out or Path(settings.stage_dir(stage) + (f"/{label}" if label else ""))
    console.print(f"[dim]{folder} · {manifest['seconds']:.1f} s · fingerprint {manifest['fingerprint'][:12]}[/]")
    return manifest


def _where(settings: Settings) -> None:
    """Where the run's model and datasets are, and how to try the tutor."""
    from mathwizard.manifest import read_manifest
    from mathwizard.stages.publish import Report

    sft, dpo = settings.stage_dir("sft"), settings.stage_dir("dpo")
    console.print(f"\n[bold]{'model':<10}[/] {dpo}/adapter  (SFT: {sft}/adapter)", highlight=False)
    published = read_manifest(Path(settings.stage_dir("publish")))
    if published is not None:
        report = Report.of(published)
        names = {"model": "model repo", "sft_dataset": "SFT data", "dpo_dataset": "DPO data"}
        for repo in report.repos:
            where = repo.url or (repo.folder if Path(repo.folder).is_absolute() else f"{report.root}/{repo.folder}")
            console.print(f"[bold]{names[repo.part]:<10}[/] {where}", highlight=False)
    figure = _example_figure(settings)
    console.print(
        f"[bold]{'try it':<10}[/] mathwizard ask --model {settings.stage_dir('dpo')} --image {figure}"
        ' "What is the measure of the marked angle?"',
        highlight=False,
    )
    console.print(f"[dim]{settings.run_dir}[/]", highlight=False)


def _example_figure(settings: Settings) -> str:
    """A figure of the run's test split on disk (the prepared images), else a placeholder."""
    from mathwizard.data.splits import read_table
    from mathwizard.errors import DataError
    from mathwizard.manifest import read_manifest
    from mathwizard.stages.prepare import RAW_DIR, FetchReport

    raw = Path(settings.stage_dir("prepare")) / RAW_DIR
    fetched = read_manifest(raw)
    try:
        names = read_table(settings.stage_dir("prepare"), "test", ["file_name"], limit=1)
    except DataError:
        return "figure.png"
    if fetched is None or names is None or names.num_rows == 0:
        return "figure.png"
    root = Path(FetchReport.of(fetched).images_root)
    path = (root if root.is_absolute() else raw / root) / str(names.column("file_name")[0])
    return str(path) if path.is_file() else "figure.png"


def print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))


@app.callback(invoke_without_command=True)
def _root(
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
    verbose: Annotated[
        int, typer.Option("--verbose", "-v", count=True, help="-v: the stages' log lines too; -vv: debug.")
    ] = 0,
) -> None:
    if version:
        typer.echo(f"mathwizard {__version__}")
        raise typer.Exit()
    from mathwizard.cli.runtime import quiet_console

    quiet_console(verbose)  # before anything imports Prefect


# ---------------------------------------------------------------------------------------------------- run
@app.command("run")
@handles_errors
def run_pipeline(
    config: ConfigOpt = None, home: HomeOpt = None, run_name: RunNameOpt = None, wait: WaitOpt = None
) -> None:
    """Run the whole pipeline; finished stages are skipped, so re-running resumes after any failure."""
    from mathwizard.cli.display import stage_table

    # The flow's own input (its run form), built from the flags; the flow derives the same settings from it.
    params = _pipeline().PipelineParams.for_command_line(config, home, run_name, wait)
    settings = params.settings()
    result = run_flow(settings, lambda pipeline: pipeline.math_wizard(params))
    console.print(stage_table(result))
    _where(settings)


# ------------------------------------------------------------------------------------------------ prepare
@app.command()
@handles_errors
def prepare(
    config: ConfigOpt = None,
    home: HomeOpt = None,
    run_name: RunNameOpt = None,
    wait: WaitOpt = None,
    out: OutOpt = None,
    source: Annotated[str | None, setting(PrepareConfig, "source", metavar="sample|hub|local")] = None,
    jsonl: Annotated[Path | None, setting(PrepareConfig, "jsonl")] = None,
    images: Annotated[Path | None, setting(PrepareConfig, "images")] = None,
    max_image_size: Annotated[int | None, setting(PrepareConfig, "max_image_size")] = None,
    splits: Annotated[str | None, setting(PrepareConfig, "splits", metavar="TRAIN,VAL,TEST")] = None,
    limit: Annotated[int | None, setting(PrepareConfig, "limit")] = None,
    workers: Annotated[int | None, setting(PrepareConfig, "workers")] = None,
) -> None:
    """Fetch, clean and split MM_Math into train/val/test parquet files plus a quarantine of rejected rows."""
    settings = load(
        config,
        home,
        run_name,
        wait,
        prepare={
            "source": source,
            "jsonl": str(jsonl) if jsonl else None,
            "images": str(images) if images else None,
            "max_image_size": max_image_size,
            "splits": splits,
            "limit": limit,
            "workers": workers,
        },
    )
    run_stage("prepare", settings, out)


# -------------------------------------------------------------------------------------------------- teach
@app.command()
@handles_errors
def teach(
    config: ConfigOpt = None,
    home: HomeOpt = None,
    run_name: RunNameOpt = None,
    wait: WaitOpt = None,
    data: Annotated[Path | None, typer.Option(help="Prepare folder (default: <home>/runs/<run>/01-prepare).")] = None,
    out: OutOpt = None,
    split: Annotated[str | None, setting(TeacherConfig, "split", metavar="train|val|test|all")] = None,
    teacher: Annotated[str | None, setting(TeacherConfig, "kind", "--teacher", metavar="auto|rule|openai")] = None,
    base_url: Annotated[str | None, setting(TeacherConfig, "base_url")] = None,
    teacher_model: Annotated[str | None, setting(TeacherConfig, "model", "--teacher-model")] = None,
    mode: Annotated[str | None, setting(TeacherConfig, "mode", metavar="online|batch")] = None,
    concurrency: Annotated[int | None, setting(TeacherConfig, "concurrency")] = None,
    rpm: Annotated[int | None, setting(TeacherConfig, "rpm")] = None,
    tpm: Annotated[int | None, setting(TeacherConfig, "tpm")] = None,
    limit: Annotated[int | None, setting(TeacherConfig, "limit")] = None,
    retry_failed: Annotated[
        bool | None, setting(TeacherConfig, "retry_failed", "--retry-failed/--no-retry-failed", default=False)
    ] = None,
) -> None:
    """Rewrite every solution into numbered steps and a final answer; invalid replies are re-asked, then excluded."""
    settings = load(
        config,
        home,
        run_name,
        wait,
        teacher={
            "split": split,
            "kind": teacher,
            "base_url": base_url,
            "model": teacher_model,
            "mode": mode,
            "concurrency": concurrency,
            "rpm": rpm,
            "tpm": tpm,
            "limit": limit,
            "retry_failed": retry_failed,
        },
    )
    manifest = run_stage("teach", settings, out, data=data)
    from mathwizard.stages.teach import FAILURES_FILE, Report

    report = Report.of(manifest)
    if report.failed:
        reasons = ", ".join(f"{k} {v}" for k, v in report.failures_by_reason.items())
        folder = out or Path(settings.stage_dir("teach"))
        console.print(f"[yellow]excluded[/] {report.failed:,} ({reasons}): {folder}/{FAILURES_FILE}", highlight=False)


# ------------------------------------------------------------------------------------------------ sft
def _training_overrides(
    max_steps: int | None,
    batch_size: int | None,
    grad_accum: int | None,
    learning_rate: float | None,
    max_length: int | None,
    save_steps: int | None,
    save_merged: bool | None,
    limit: int | None,
) -> dict[str, Any]:
    return {
        "max_steps": max_steps,
        "per_device_train_batch_size": batch_size,
        "gradient_accumulation_steps": grad_accum,
        "learning_rate": learning_rate,
        "max_length": max_length,
        "save_steps": save_steps,
        "save_merged": save_merged,
        "limit": limit,
    }


@app.command()
@handles_errors
def sft(
    config: ConfigOpt = None,
    home: HomeOpt = None,
    run_name: RunNameOpt = None,
    wait: WaitOpt = None,
    data: Annotated[Path | None, typer.Option(help="Teach stage folder (default: <home>/runs/<run>/02-teach).")] = None,
    out: OutOpt = None,
    base_model: Annotated[str | None, setting(ModelConfig, "name", "--base-model")] = None,
    backend: BackendOpt = None,
    max_steps: MaxStepsOpt = None,
    batch_size: BatchOpt = None,
    grad_accum: AccumOpt = None,
    learning_rate: LrOpt = None,
    max_length: MaxLengthOpt = None,
    save_steps: SaveStepsOpt = None,
    save_merged: MergedOpt = None,
    limit: TrainLimitOpt = None,
) -> None:
    """Fine-tune the base model on the teacher's solutions (LoRA; resumes from the last checkpoint)."""
    settings = load(
        config,
        home,
        run_name,
        wait,
        model={"name": base_model, "backend": backend},
        sft=_training_overrides(
            max_steps, batch_size, grad_accum, learning_rate, max_length, save_steps, save_merged, limit
        ),
    )
    run_stage("sft", settings, out, data=data)


# -------------------------------------------------------------------------------------------------- pairs
@app.command()
@handles_errors
def pairs(
    config: ConfigOpt = None,
    home: HomeOpt = None,
    run_name: RunNameOpt = None,
    wait: WaitOpt = None,
    data: Annotated[Path | None, typer.Option(help="Teach stage folder (default: <home>/runs/<run>/02-teach).")] = None,
    out: OutOpt = None,
    sft: Annotated[
        str | None,
        typer.Option(help="SFT stage folder that samples the flawed answers (default: <home>/runs/<run>/03-sft)."),
    ] = None,
    backend: BackendOpt = None,
    limit: Annotated[int | None, setting(PairsConfig, "limit")] = None,
    batch_size: Annotated[int | None, setting(PairsConfig, "batch_size")] = None,
    max_new_tokens: Annotated[int | None, setting(PairsConfig, "max_new_tokens")] = None,
    temperature: Annotated[float | None, setting(PairsConfig, "temperature")] = None,
    top_p: Annotated[float | None, setting(PairsConfig, "top_p")] = None,
    max_attempts: Annotated[int | None, setting(PairsConfig, "max_attempts")] = None,
    fallback: Annotated[str | None, setting(PairsConfig, "fallback", metavar="rule|none")] = None,
    chunk_size: Annotated[int | None, setting(PairsConfig, "chunk_size")] = None,
) -> None:
    """Sample flawed answers from the SFT model and pair them with the teacher's solutions for DPO."""
    settings = load(
        config,
        home,
        run_name,
        wait,
        model={"backend": backend},
        pairs={
            "limit": limit,
            "batch_size": batch_size,
            "max_new_tokens": max_new_tokens,
            "temperature": temperature,
            "top_p": top_p,
            "max_attempts": max_attempts,
            "fallback": fallback,
            "chunk_size": chunk_size,
        },
    )
    run_stage("pairs", settings, out, sft=sft, data=data)


# ---------------------------------------------------------------------------------------------------- dpo
@app.command()
@handles_errors
def dpo(
    config: ConfigOpt = None,
    home: HomeOpt = None,
    run_name: RunNameOpt = None,
    wait: WaitOpt = None,
    pairs: Annotated[
        Path | None, typer.Option(help="Pairs stage folder (default: <home>/runs/<run>/04-pairs).")
    ] = None,
    out: OutOpt = None,
    sft: Annotated[
        Path | None, typer.Option(help="SFT stage folder or its adapter/ (default: <home>/runs/<run>/03-sft).")
    ] = None,
    backend: BackendOpt = None,
    beta: Annotated[float | None, setting(DPOConfig, "beta")] = None,
    max_steps: MaxStepsOpt = None,
    batch_size: BatchOpt = None,
    grad_accum: AccumOpt = None,
    learning_rate: LrOpt = None,
    max_length: MaxLengthOpt = None,
    save_steps: SaveStepsOpt = None,
    save_merged: MergedOpt = None,
    limit: TrainLimitOpt = None,
) -> None:
    """Align the SFT model with DPO on the preference pairs, images included (resumes from the last checkpoint)."""
    settings = load(
        config,
        home,
        run_name,
        wait,
        model={"backend": backend},
        dpo={
            "beta": beta,
            **_training_overrides(
                max_steps, batch_size, grad_accum, learning_rate, max_length, save_steps, save_merged, limit
            ),
        },
    )
    run_stage("dpo", settings, out, sft=sft, pairs=pairs)


# --------------------------------------------------------------------------------------------------- eval
@app.command("eval")
@handles_errors
def evaluate(
    config: ConfigOpt = None,
    home: HomeOpt = None,
    run_name: RunNameOpt = None,
    wait: WaitOpt = None,
    data: Annotated[Path | None, typer.Option(help="Teach or prepare folder (default: 02-teach).")] = None,
    out: Annotated[
        Path | None, typer.Option(help="Output folder (default: <home>/runs/<run>/06-eval/<label>).")
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(help="Stage folder (03-sft, 05-dpo), model dir, 'tiny' or Hub id (default: the label's model)."),
    ] = None,
    label: Annotated[str, typer.Option(help="Name in reports and tables: base, sft or dpo.")] = "sft",
    backend: BackendOpt = None,
    limit: Annotated[int | None, setting(EvalConfig, "limit")] = None,
    batch_size: Annotated[int | None, setting(EvalConfig, "batch_size")] = None,
    max_new_tokens: Annotated[int | None, setting(EvalConfig, "max_new_tokens")] = None,
) -> None:
    """Accuracy of the model's boxed answers on the test split, overall and by difficulty."""
    settings = load(
        config,
        home,
        run_name,
        wait,
        model={"backend": backend},
        eval={"limit": limit, "batch_size": batch_size, "max_new_tokens": max_new_tokens},
    )
    run_stage("eval", settings, out, model=model, data=data, label=label)


# ------------------------------------------------------------------------------------------------ publish
@app.command()
@handles_errors
def publish(
    config: ConfigOpt = None,
    home: HomeOpt = None,
    run_name: RunNameOpt = None,
    wait: WaitOpt = None,
    run_dir: Annotated[
        Path | None, typer.Option(help="Run folder holding 01-prepare ... 06-eval (default: <home>/runs/<run>).")
    ] = None,
    out: OutOpt = None,
    push: Annotated[bool | None, setting(PublishConfig, "push", "--push/--no-push")] = None,
    target: Annotated[Path | None, setting(PublishConfig, "target")] = None,
    namespace: Annotated[str | None, setting(PublishConfig, "namespace")] = None,
    private: Annotated[bool | None, setting(PublishConfig, "private", "--private/--public")] = None,
    require_improvement: Annotated[
        bool | None,
        setting(PublishConfig, "require_improvement", "--require-improvement/--no-require-improvement"),
    ] = None,
    endpoint: Annotated[str | None, setting(PublishConfig, "endpoint")] = None,
    push_merged: Annotated[bool | None, setting(PublishConfig, "push_merged", "--push-merged/--no-push-merged")] = None,
) -> None:
    """Lay out the DPO model and the SFT and DPO datasets with their cards as Hub repos; --push uploads them (token:
    HF_TOKEN or `hf auth login`; private unless --public). Without --push nothing is uploaded."""
    settings = load(
        config,
        home,
        run_name,
        wait,
        publish={
            "push": push,
            "target": str(target) if target else None,
            "namespace": namespace,
            "private": private,
            "require_improvement": require_improvement,
            "endpoint": endpoint,
            "push_merged": push_merged,
        },
    )
    run_stage("publish", settings, out, run_dir=run_dir)


# ---------------------------------------------------------------------------------------------------- ask
@app.command()
@handles_errors
def ask(
    question: Annotated[str, typer.Argument(help="The question about the figure.")],
    image: Annotated[Path, typer.Option(help="The figure (PNG or JPEG).")],
    model: Annotated[
        str | None,
        typer.Option(
            help="Stage folder (03-sft, 05-dpo) or its adapter/, model dir, 'tiny' or Hub id (default: 05-dpo)."
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of streaming.")] = False,
    max_new_tokens: Annotated[int, typer.Option(help="Most tokens in the answer.")] = 1024,
    backend: Annotated[str, typer.Option(metavar="auto|hf|unsloth", help="Model backend.")] = "auto",
    config: ConfigOpt = None,
    home: HomeOpt = None,
    run_name: RunNameOpt = None,
) -> None:
    """Ask the tutor about a figure: streams the worked solution, then prints the final answer."""
    from mathwizard.ask import Tutor, load_image

    settings = load_settings(config, home=home, run_name=run_name)
    figure = load_image(image, settings.prepare.max_image_pixels)  # a bad image fails before the model loads
    if not question.strip():
        from mathwizard.errors import DataError

        raise DataError("the question is empty; pass the question as the command's argument")
    location = model or settings.stage_dir("dpo")
    if not as_json:
        console.print(f"[dim]loading {location} …[/]", highlight=False)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # the answer is the output; no weight-loading bars around it
    tutor = Tutor.load(location, backend=backend)
    if as_json:
        answer = tutor.ask(question, figure, max_new_tokens=max_new_tokens)
        typer.echo(json.dumps(answer.to_dict(), ensure_ascii=False))
        return
    answer = tutor.ask(question, figure, max_new_tokens=max_new_tokens, on_text=lambda text: typer.echo(text, nl=False))
    typer.echo("")
    final = answer.final_answer if answer.final_answer is not None else "(none: the reply has no \\boxed{} answer)"
    typer.echo(f"Final answer: {final}")
    console.print(f"[dim]{answer.tokens} tokens · {answer.model}[/]", highlight=False)


# ------------------------------------------------------------------------------------------------- config
@app.command("config")
@handles_errors
def show_config(config: ConfigOpt = None, home: HomeOpt = None, run_name: RunNameOpt = None) -> None:
    """Print the effective settings (defaults < --config < .env/env < flags) as JSON."""
    print_json(load_settings(config, home=home, run_name=run_name).model_dump(mode="json"))


# ------------------------------------------------------------------------------------------------- model
model_app = typer.Typer(help="Build the models the project makes itself (no download).", no_args_is_help=True)
app.add_typer(model_app, name="model")


@model_app.command("tiny")
@handles_errors
def model_tiny(
    out: Annotated[Path, typer.Option(help="Folder to write the model and processor into.")],
) -> None:
    """Build the tiny random gemma-3n (about 0.7 M parameters) that runs every stage on a CPU in seconds."""
    from mathwizard.models.tiny import build_tiny

    folder = build_tiny(out)
    console.print(f"[bold green]tiny gemma-3n[/] written to {folder}", highlight=False)


@model_app.command("random-e2b")
@handles_errors
def model_random_e2b(
    out: Annotated[Path, typer.Option(help="Folder to write the model and processor into.")],
    device: Annotated[str, typer.Option(help="Where to initialise the weights: cpu or cuda (much faster).")] = "cpu",
    dtype: Annotated[str, typer.Option(metavar="bfloat16|float16|float32", help="Weights dtype.")] = "bfloat16",
) -> None:
    """Build a random model with gemma-3n E2B's real architecture and vocabulary layout (~5.4 B parameters)."""
    from mathwizard.errors import ConfigError

    if dtype not in ("bfloat16", "float16", "float32"):
        raise ConfigError(f"--dtype must be bfloat16, float16 or float32, got {dtype!r}")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            from mathwizard.errors import ModelError

            raise ModelError("--device cuda needs a CUDA GPU and none is visible; use --device cpu")
    from mathwizard.models.random_e2b import build_random_e2b

    folder = build_random_e2b(out, device=device, dtype=dtype)
    console.print(f"[bold green]random gemma-3n E2B[/] written to {folder}", highlight=False)


# ---------------------------------------------------------------------------------------------------- up
@app.command()
@handles_errors
def up(
    config: ConfigOpt = None,
    home: HomeOpt = None,
    port: Annotated[int, typer.Option(help="Port of the Prefect server on 127.0.0.1.")] = 4200,
    prefect_home: Annotated[
        Path | None, typer.Option(help="PREFECT_HOME of the stack (default: <home>/prefect, or ./mathwizard-prefect).")
    ] = None,
    cuda: Annotated[
        bool | None,
        typer.Option("--cuda/--no-cuda", help="Start a worker on the cuda pool (default: when a GPU is seen)."),
    ] = None,
    schedules: Annotated[
        bool,
        typer.Option(
            "--schedules/--no-schedules",
            help="Switch the deployments' schedules on (the weekly real run: a Hub download, a paid teacher, a GPU);"
            " default: deployed off.",
        ),
    ] = False,
) -> None:
    """Start a local Prefect stack: server, work pools, deployments, workers; Ctrl-C stops it (workers first)."""
    import time

    from mathwizard import storage

    start_stack = _from_checkout("deployments.localstack").up
    settings = load(config, home)
    root = settings.home if storage.is_remote(settings.home) else str(Path(settings.home).resolve())
    state_home = prefect_home or (Path("mathwizard-prefect") if storage.is_remote(root) else Path(root) / "prefect")
    stack = start_stack(
        state_home,
        port=port,
        cuda_worker=cuda,
        schedules=schedules,
        env={"MATHWIZARD_HOME": root},
        announce=console.print,
    )
    try:
        console.print(f"[bold green]ready:[/] Prefect UI at {stack.ui_url}  (artifacts under {root})", highlight=False)
        console.print(
            f"run the pipeline: PREFECT_API_URL={stack.api_url} prefect deployment run math-wizard/smoke",
            highlight=False,
        )
        console.print("[dim]Ctrl-C stops the workers, then the server[/]")
        while stack.server is not None and stack.server.poll() is None:
            time.sleep(1)
        console.print(f"[red]the Prefect server stopped[/]; see {stack.logs}/server.log", highlight=False)
    except KeyboardInterrupt:
        console.print("stopping workers, then the server …")
    finally:
        stack.stop()
