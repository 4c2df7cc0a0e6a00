"""The `mathwizard` command line: turns flags into settings and runs the flows.

Usage: `mathwizard run` (whole pipeline on embedded defaults), `mathwizard prepare --source sample`, ...
Flows are imported inside the commands, so `mathwizard --help` starts fast.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from mathwizard import __version__
from mathwizard.config import Settings, load_settings
from mathwizard.errors import MathWizardError

app = typer.Typer(
    name="mathwizard",
    help="Turn MM_Math into a multimodal math tutor: prepare → teach → sft → pairs → dpo → eval → publish.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
console = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="YAML settings file, e.g. deployments/recipes/smoke.yaml.")
]
HomeOpt = Annotated[str | None, typer.Option("--home", help="Artifact root folder or URL (MATHWIZARD_HOME).")]
RunNameOpt = Annotated[str | None, typer.Option("--run-name", help="Run folder under <home>/runs (default: default).")]


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


def load(config: Path | None, home: str | None = None, run_name: str | None = None, **overrides: Any) -> Settings:
    """Settings from the file, env and flags, with Prefect set up for this machine."""
    settings = load_settings(config, home=home, run_name=run_name, **overrides)
    prepare_prefect_env(settings)
    return settings


def prepare_prefect_env(settings: Settings) -> None:
    """Offline-friendly Prefect defaults, set before prefect is imported; explicit env vars win."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "mathwizard")
    # The ephemeral API's 20 s default ran out on a freshly started GPU machine (cold imports and database).
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    if "://" not in settings.home:
        results = Path(settings.home).resolve() / "prefect-results"
        os.environ.setdefault("PREFECT_LOCAL_STORAGE_PATH", str(results))
    logging.getLogger("mathwizard").setLevel(logging.INFO)


def print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))


@app.callback(invoke_without_command=True)
def _root(
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
) -> None:
    if version:
        typer.echo(f"mathwizard {__version__}")
        raise typer.Exit()


@app.command("config")
@handles_errors
def show_config(config: ConfigOpt = None, home: HomeOpt = None, run_name: RunNameOpt = None) -> None:
    """Print the effective settings (defaults < --config < .env/env < flags) as JSON."""
    print_json(load_settings(config, home=home, run_name=run_name).model_dump(mode="json"))


# ------------------------------------------------------------------------------------------------ prepare
@app.command()
@handles_errors
def prepare(
    config: ConfigOpt = None,
    home: HomeOpt = None,
    run_name: RunNameOpt = None,
    source: Annotated[
        str | None,
        typer.Option(
            metavar="sample|hub|local", help="sample: bundled; hub: THU-KEG/MM_Math; local: --jsonl/--images."
        ),
    ] = None,
    jsonl: Annotated[
        Path | None, typer.Option(help="source=local: MM_Math jsonl/json file (or a folder holding MM_Math).")
    ] = None,
    images: Annotated[Path | None, typer.Option(help="source=local: image folder or zip/tar archive.")] = None,
    out: Annotated[Path | None, typer.Option(help="Output folder (default: <home>/runs/<run>/01-prepare).")] = None,
    max_image_size: Annotated[int | None, typer.Option(help="Longest image side in pixels (default 512).")] = None,
    splits: Annotated[str | None, typer.Option(help="train,val,test fractions, e.g. 0.9,0.05,0.05.")] = None,
    limit: Annotated[int | None, typer.Option(help="Use only the first N rows (for trials).")] = None,
    workers: Annotated[int | None, typer.Option(help="Image-cleaning processes (default: all cores).")] = None,
) -> None:
    """Fetch, clean and split MM_Math into train/val/test parquet files plus a quarantine of rejected rows."""
    settings = load(
        config,
        home,
        run_name,
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
    from mathwizard.stages.prepare import check_inputs

    folder = out or Path(settings.stage_dir("prepare"))
    check_inputs(settings.prepare, folder)  # missing files or options: one line here, not a failed flow run
    from flows.prepare import prepare_flow

    manifest = prepare_flow(settings=settings, out=str(out) if out else None)
    counts = manifest["counts"]
    console.print(
        f"[bold green]prepared[/] {counts.get('kept', 0)} of {counts.get('rows_in', 0)} rows → "
        f"train {counts.get('train', 0)} · val {counts.get('val', 0)} · test {counts.get('test', 0)}"
    )
    reasons = {k.split(".", 1)[1]: v for k, v in counts.items() if k.startswith("quarantined.")}
    if reasons:
        listed = ", ".join(f"{k} {v}" for k, v in sorted(reasons.items()))
        console.print(f"[yellow]quarantined[/] {counts.get('quarantined', 0)} ({listed}): {folder}/quarantine.jsonl")
    console.print(f"[dim]{folder} · fingerprint {manifest['fingerprint'][:12]}[/]", highlight=False)


# -------------------------------------------------------------------------------------------------- pairs
@app.command()
@handles_errors
def pairs(
    config: ConfigOpt = None,
    home: HomeOpt = None,
    run_name: RunNameOpt = None,
    model: Annotated[
        str | None,
        typer.Option(help="SFT stage folder (its adapter/), a model dir, 'tiny' or a Hub id (default: 03-sft)."),
    ] = None,
    data: Annotated[Path | None, typer.Option(help="Teach stage folder (default: <home>/runs/<run>/02-teach).")] = None,
    out: Annotated[Path | None, typer.Option(help="Output folder (default: <home>/runs/<run>/04-pairs).")] = None,
    backend: Annotated[str | None, typer.Option(metavar="auto|hf|unsloth", help="Model backend.")] = None,
    limit: Annotated[int | None, typer.Option(help="Only the first N items of each split.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Prompts per generate call (default 16).")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="Most tokens per flawed answer (default 1024).")] = None,
    temperature: Annotated[float | None, typer.Option(help="Sampling temperature (default 1.0).")] = None,
    top_p: Annotated[float | None, typer.Option(help="Nucleus sampling (default 0.95).")] = None,
    max_attempts: Annotated[int | None, typer.Option(help="Samples per item before the fallback (default 3).")] = None,
    fallback: Annotated[
        str | None, typer.Option(metavar="rule|none", help="After max attempts: write a rule-made flaw, or exclude.")
    ] = None,
    chunk_size: Annotated[int | None, typer.Option(help="Items per resumable chunk (default 64).")] = None,
) -> None:
    """Sample flawed answers from the SFT model and pair them with the teacher's solutions for DPO."""
    settings = load(
        config,
        home,
        run_name,
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
    from flows.pairs import pairs_flow

    manifest = pairs_flow(settings=settings, sft=model, data=str(data) if data else None, out=str(out) if out else None)
    c = manifest["counts"]
    folder = out or Path(settings.stage_dir("pairs"))
    split_counts = " · ".join(f"{s} {c.get(f'{s}_pairs', 0)}" for s in settings.pairs.splits)
    console.print(
        f"[bold green]paired[/] {c.get('pairs', 0)} ({split_counts}): {c.get('from_model', 0)} rejected answers "
        f"from the model, {c.get('from_rule', 0)} from the rule fallback, {c.get('failed', 0)} excluded"
    )
    console.print(f"[dim]{folder} · fingerprint {manifest['fingerprint'][:12]}[/]", highlight=False)


# --------------------------------------------------------------------------------------------------- eval
@app.command("eval")
@handles_errors
def evaluate(
    config: ConfigOpt = None,
    home: HomeOpt = None,
    run_name: RunNameOpt = None,
    model: Annotated[
        str | None,
        typer.Option(help="Stage folder (03-sft, 05-dpo), model dir, 'tiny' or Hub id (default: the label's model)."),
    ] = None,
    label: Annotated[str, typer.Option(help="Name in reports and tables: base, sft or dpo.")] = "sft",
    data: Annotated[Path | None, typer.Option(help="Teach or prepare folder (default: 02-teach).")] = None,
    out: Annotated[
        Path | None, typer.Option(help="Output folder (default: <home>/runs/<run>/06-eval/<label>).")
    ] = None,
    backend: Annotated[str | None, typer.Option(metavar="auto|hf|unsloth", help="Model backend.")] = None,
    limit: Annotated[int | None, typer.Option(help="Evaluate only the first N problems.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Prompts per generate call (default 16).")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="Most tokens per answer (default 1024).")] = None,
) -> None:
    """Accuracy of the model's boxed answers on the test split, overall and by difficulty."""
    settings = load(
        config,
        home,
        run_name,
        model={"backend": backend},
        eval={"limit": limit, "batch_size": batch_size, "max_new_tokens": max_new_tokens},
    )
    from flows.evaluate import eval_flow

    manifest = eval_flow(
        settings=settings,
        model=model,
        data=str(data) if data else None,
        out=str(out) if out else None,
        label=label,
    )
    from mathwizard.stages.evaluate import load_report

    folder = out or Path(f"{settings.stage_dir('eval')}/{label}")
    report = load_report(folder)
    by = " · ".join(f"{d} {100 * p['accuracy']:.1f}% (n={p['n']})" for d, p in report["by_difficulty"].items())
    console.print(
        f"[bold green]{label}[/]: accuracy {100 * report['accuracy']:.1f}% on {report['n']} problems, "
        f"format {100 * report['format_rate']:.1f}%" + (f" — {by}" if by else "")
    )
    console.print(f"[dim]{folder} · fingerprint {manifest['fingerprint'][:12]}[/]", highlight=False)


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

    figure = load_image(image)  # a bad image fails before the model loads
    if not question.strip():
        from mathwizard.errors import DataError

        raise DataError("the question is empty; pass the question as the command's argument")
    location = model or load_settings(config, home=home, run_name=run_name).stage_dir("dpo")
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


# ------------------------------------------------------------------------------------------- sft / dpo
BackendOpt = Annotated[str | None, typer.Option("--backend", metavar="auto|hf|unsloth", help="Training backend.")]
MaxStepsOpt = Annotated[int | None, typer.Option("--max-steps", help="Optimizer steps.")]
BatchOpt = Annotated[int | None, typer.Option("--batch-size", help="Examples per device per micro-batch.")]
AccumOpt = Annotated[int | None, typer.Option("--grad-accum", help="Micro-batches per optimizer step.")]
LrOpt = Annotated[float | None, typer.Option("--learning-rate", help="Peak learning rate.")]
MaxLengthOpt = Annotated[int | None, typer.Option("--max-length", help="Longest tokenized example.")]
SaveStepsOpt = Annotated[int | None, typer.Option("--save-steps", help="Checkpoint every N steps.")]
MergedOpt = Annotated[bool | None, typer.Option("--save-merged/--no-save-merged", help="Also save merged weights.")]
LimitOpt = Annotated[int | None, typer.Option("--limit", help="Train on only the first N examples.")]


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


def _training_summary(stage: str, manifest: dict[str, Any], out: str) -> None:
    extra = manifest["extra"]
    resumed = f", resumed from step {extra['resumed_from_step']}" if extra.get("resumed_from_step") else ""
    loss = extra.get("final_loss")
    line = f"[bold green]{stage}[/]: {extra.get('global_step')} steps on {extra.get('backend')}{resumed}"
    line += f", final loss {loss:.4f}" if isinstance(loss, float) else ""
    if isinstance(extra.get("eval_loss"), float):
        line += f", val loss {extra['eval_loss']:.4f}"
    if isinstance(extra.get("final_rewards_accuracies"), float):
        line += f", reward accuracy {extra['final_rewards_accuracies']:.2f}"
    console.print(line, highlight=False)
    console.print(f"[dim]{out}/adapter · fingerprint {manifest['fingerprint'][:12]}[/]", highlight=False)


@app.command()
@handles_errors
def sft(
    config: ConfigOpt = None,
    home: HomeOpt = None,
    run_name: RunNameOpt = None,
    data: Annotated[Path | None, typer.Option(help="Teach stage folder (default: <home>/runs/<run>/02-teach).")] = None,
    out: Annotated[Path | None, typer.Option(help="Output folder (default: <home>/runs/<run>/03-sft).")] = None,
    model: Annotated[str | None, typer.Option(help="Base model: 'tiny', a Hub id or a model folder.")] = None,
    backend: BackendOpt = None,
    max_steps: MaxStepsOpt = None,
    batch_size: BatchOpt = None,
    grad_accum: AccumOpt = None,
    learning_rate: LrOpt = None,
    max_length: MaxLengthOpt = None,
    save_steps: SaveStepsOpt = None,
    save_merged: MergedOpt = None,
    limit: LimitOpt = None,
) -> None:
    """Fine-tune the base model on the teacher's solutions (LoRA; resumes from the last checkpoint)."""
    settings = load(
        config,
        home,
        run_name,
        model={"name": model, "backend": backend},
        sft=_training_overrides(
            max_steps, batch_size, grad_accum, learning_rate, max_length, save_steps, save_merged, limit
        ),
    )
    from mathwizard.stages.sft import check_inputs

    check_inputs(settings.sft, settings.model, data or Path(settings.stage_dir("teach")))  # one line, before Prefect
    from flows.sft import sft_flow

    manifest = sft_flow(settings=settings, data=str(data) if data else None, out=str(out) if out else None)
    _training_summary("sft", manifest, str(out or settings.stage_dir("sft")))


@app.command()
@handles_errors
def dpo(
    config: ConfigOpt = None,
    home: HomeOpt = None,
    run_name: RunNameOpt = None,
    model: Annotated[
        Path | None, typer.Option(help="SFT stage folder or its adapter/ (default: <home>/runs/<run>/03-sft).")
    ] = None,
    pairs: Annotated[
        Path | None, typer.Option(help="Pairs stage folder (default: <home>/runs/<run>/04-pairs).")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Output folder (default: <home>/runs/<run>/05-dpo).")] = None,
    backend: BackendOpt = None,
    beta: Annotated[float | None, typer.Option(help="DPO beta (default 0.1).")] = None,
    max_steps: MaxStepsOpt = None,
    batch_size: BatchOpt = None,
    grad_accum: AccumOpt = None,
    learning_rate: LrOpt = None,
    max_length: MaxLengthOpt = None,
    save_steps: SaveStepsOpt = None,
    save_merged: MergedOpt = None,
    limit: LimitOpt = None,
) -> None:
    """Align the SFT model with DPO on the preference pairs, images included (resumes from the last checkpoint)."""
    settings = load(
        config,
        home,
        run_name,
        model={"backend": backend},
        dpo={
            "beta": beta,
            **_training_overrides(
                max_steps, batch_size, grad_accum, learning_rate, max_length, save_steps, save_merged, limit
            ),
        },
    )
    from mathwizard.stages.dpo import check_inputs

    check_inputs(  # one line, before Prefect starts
        settings.dpo,
        settings.model,
        model or Path(settings.stage_dir("sft")),
        pairs or Path(settings.stage_dir("pairs")),
    )
    from flows.dpo import dpo_flow

    manifest = dpo_flow(
        settings=settings,
        sft=str(model) if model else None,
        pairs=str(pairs) if pairs else None,
        out=str(out) if out else None,
    )
    _training_summary("dpo", manifest, str(out or settings.stage_dir("dpo")))


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


# ---------------------------------------------------------------------------------------------- run / up
@app.command("run")
@handles_errors
def run_pipeline(config: ConfigOpt = None, home: HomeOpt = None, run_name: RunNameOpt = None) -> None:
    """Run the whole pipeline; finished stages are skipped, so re-running resumes after any failure."""
    settings = load(config, home, run_name)
    from flows.pipeline import math_wizard, remote_result_storage

    block = remote_result_storage(settings)
    pipeline = math_wizard.with_options(result_storage=block) if block is not None else math_wizard
    result = pipeline(settings=settings)
    for stage, info in result.items():
        counts = " · ".join(f"{k} {v}" for k, v in list(info["counts"].items())[:3])
        console.print(f"[bold green]✓[/] {stage:<12} {info['seconds']:>8.1f} s  [dim]{counts}[/]", highlight=False)
    console.print(f"[dim]{settings.run_dir}[/]", highlight=False)


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
) -> None:
    """Start a local Prefect stack: server, work pools, deployments, workers; Ctrl-C stops it (workers first)."""
    import time

    from mathwizard import storage
    from mathwizard.localstack import up as start_stack

    settings = load(config, home)
    root = settings.home if storage.is_remote(settings.home) else str(Path(settings.home).resolve())
    env = {"MATHWIZARD_HOME": root}
    if storage.is_remote(root):
        from flows.pipeline import RESULT_BLOCK

        state_home = prefect_home or Path("mathwizard-prefect")
        env["PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK"] = f"remote-file-system/{RESULT_BLOCK}"
    else:
        state_home = prefect_home or Path(root) / "prefect"
        env["PREFECT_LOCAL_STORAGE_PATH"] = str(Path(root) / "prefect-results")
    stack = start_stack(state_home, port=port, cuda_worker=cuda, env=env, announce=console.print)
    try:
        if storage.is_remote(root):
            os.environ["PREFECT_API_URL"] = stack.api_url
            from flows.pipeline import remote_result_storage

            remote_result_storage(settings.model_copy(update={"home": root}))
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


# ------------------------------------------------------------------------------------------------ publish
@app.command()
@handles_errors
def publish(
    config: ConfigOpt = None,
    home: HomeOpt = None,
    run_name: RunNameOpt = None,
    run_dir: Annotated[
        Path | None, typer.Option(help="Run folder holding 01-prepare ... 06-eval (default: <home>/runs/<run>).")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Stage folder (default: <home>/runs/<run>/07-publish).")] = None,
    target: Annotated[
        Path | None, typer.Option(help="Write the repos into this folder instead of uploading (default without token).")
    ] = None,
    namespace: Annotated[str | None, typer.Option(help="Hub user or organisation owning the repos.")] = None,
    private: Annotated[
        bool | None, typer.Option("--private/--public", help="Visibility of repos created now (default private).")
    ] = None,
    require_improvement: Annotated[
        bool | None,
        typer.Option("--require-improvement/--no-require-improvement", help="Refuse a DPO model scoring below SFT."),
    ] = None,
    endpoint: Annotated[
        str | None, typer.Option(help="Hub endpoint URL (default: huggingface.co / HF_ENDPOINT).")
    ] = None,
    push_merged: Annotated[
        bool | None, typer.Option("--push-merged/--no-push-merged", help="Also upload 05-dpo/merged/.")
    ] = None,
) -> None:
    """Push the DPO model and the SFT and DPO datasets with their cards to the Hub (token: HF_TOKEN or `hf auth
    login`), or write them into --target (the default without a token)."""
    settings = load(
        config,
        home,
        run_name,
        publish={
            "target": str(target) if target else None,
            "namespace": namespace,
            "private": private,
            "require_improvement": require_improvement,
            "endpoint": endpoint,
            "push_merged": push_merged,
        },
    )
    from flows.publish import publish_flow

    manifest = publish_flow(settings=settings, run_dir=str(run_dir) if run_dir else None, out=str(out) if out else None)
    extra = manifest["extra"]
    uploaded = extra.get("destination") == "hub"
    for repo in extra.get("repos", []):
        if uploaded:
            done = f"commit {repo['commit'][:12]}" if repo.get("commit") else "already up to date"
            console.print(f"[bold green]published[/] {repo['url']} ({done})", highlight=False)
        else:
            folder = repo["folder"] if Path(repo["folder"]).is_absolute() else f"{extra['root']}/{repo['folder']}"
            console.print(f"[bold green]wrote[/] {repo['repo_id']} → {folder}", highlight=False)
    if not uploaded:
        why = "--target given" if settings.publish.target else "no Hub token (HF_TOKEN, hf auth login) or offline"
        console.print(f"[dim]not uploaded: {why}[/]")
    console.print(f"[dim]fingerprint {manifest['fingerprint'][:12]}[/]", highlight=False)


# -------------------------------------------------------------------------------------------------- teach
@app.command()
@handles_errors
def teach(
    config: ConfigOpt = None,
    home: HomeOpt = None,
    run_name: RunNameOpt = None,
    data: Annotated[Path | None, typer.Option(help="Prepare folder (default: <home>/runs/<run>/01-prepare).")] = None,
    out: Annotated[Path | None, typer.Option(help="Output folder (default: <home>/runs/<run>/02-teach).")] = None,
    split: Annotated[str | None, typer.Option(metavar="train|val|test|all", help="Split(s) to rewrite.")] = None,
    teacher: Annotated[
        str | None,
        typer.Option(metavar="rule|openai", help="openai: the API (key from env/.env); rule: offline. Default: auto."),
    ] = None,
    base_url: Annotated[
        str | None, typer.Option(help="OpenAI-compatible endpoint, e.g. http://localhost:8000/v1.")
    ] = None,
    model: Annotated[str | None, typer.Option(help="Teacher model name at the endpoint.")] = None,
    concurrency: Annotated[int | None, typer.Option(help="Requests in flight at once.")] = None,
    rpm: Annotated[int | None, typer.Option(help="Requests per minute allowed by the API.")] = None,
    tpm: Annotated[int | None, typer.Option(help="Tokens per minute allowed by the API.")] = None,
    limit: Annotated[int | None, typer.Option(help="Rewrite only the first N items of each split.")] = None,
) -> None:
    """Rewrite every solution into numbered steps and a final answer; invalid replies are re-asked, then excluded."""
    settings = load(
        config,
        home,
        run_name,
        teacher={
            "split": split,
            "kind": teacher,
            "base_url": base_url,
            "model": model,
            "concurrency": concurrency,
            "rpm": rpm,
            "tpm": tpm,
            "limit": limit,
        },
    )
    from mathwizard.stages.teach import resolve_kind

    resolve_kind(settings.teacher)  # kind=openai without a key: one line here, not a failed flow run
    from flows.teach import teach_flow

    manifest = teach_flow(settings=settings, data=str(data) if data else None, out=str(out) if out else None)
    c, extra = manifest["counts"], manifest["extra"]
    folder = out or Path(settings.stage_dir("teach"))
    console.print(
        f"[bold green]taught[/] {c.get('written', 0):,} of {c.get('items', 0):,} items with "
        f"{extra.get('teacher')} ({extra.get('teacher_model')}): {c.get('api_calls', 0):,} API calls, "
        f"{c.get('cache_hits', 0):,} cache hits, {c.get('retries', 0):,} retries",
        highlight=False,
    )
    if c.get("failed"):
        reasons = ", ".join(f"{k} {v}" for k, v in (extra.get("failures_by_reason") or {}).items())
        console.print(f"[yellow]excluded[/] {c['failed']:,} ({reasons}): {folder}/failures.jsonl", highlight=False)
    console.print(f"[dim]{folder} · fingerprint {manifest['fingerprint'][:12]}[/]", highlight=False)
