"""One stage on several GPUs: the stage starts itself once per GPU with torch's own launcher and waits for it.

A GPU stage (sft, dpo, pairs, eval) asks `world_size(model)` how many processes it should run on (`model.gpus`;
None: every visible CUDA device). Above one, and when not already a rank of such a launch, it calls `launch`, which
runs `python -m torch.distributed.run --standalone --nproc-per-node N -m mathwizard.launch <job.json>`: torchrun
sets RANK / LOCAL_RANK / WORLD_SIZE and the rendezvous, and each rank runs the job's target function. Training targets
are plain transformers Trainers, which see those variables and train data-parallel (DDP: NCCL on CUDA, gloo on a
CPU); generation targets take their share of the items. The launching process (the CLI or a Prefect worker) keeps
the stage's folder, manifest and run lock; its ranks never take the lock (they call the library, not the flows).

What comes back over the ranks' stdout, one JSON line each behind a marker: progress reports (relayed to the stage's
`progress`), the library's log records (re-logged here, so the Prefect UI and `-v` still show them), a failure (raised
here as the same one-line error), and rank 0's result (written to `<job>.result.json`). Everything else the ranks
print goes to the debug log; their stderr to a file, where torchrun's summary names a rank that died without a word
(the OOM killer, a native crash): the error names it, not the ranks stopped after it.

The launch dies with its launcher: torchrun is started with PR_SET_PDEATHSIG (as the CLI's Prefect server is, see
`mathwizard/cli/runtime.py`), each rank asks for the same towards torchrun, and Ctrl-C or an error in the launcher
stops the whole process group (SIGTERM, then SIGKILL after a grace period).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from mathwizard.errors import ConfigError, MathWizardError
from mathwizard.processes import die_with_parent, dying_with_this_process

if TYPE_CHECKING:
    from mathwizard.config import ModelConfig
    from mathwizard.progress import Progress

log = logging.getLogger(__name__)

MARKER = "@@mathwizard "  # a rank's message to the launcher: the marker, then one JSON object
JOB_DIR = ".launch"
LAUNCHED_ENV = "MATHWIZARD_LAUNCHED"  # set for the ranks of a launch (alongside torchrun's own variables)
_GRACE_S = 10.0  # after SIGTERM, how long the ranks get to stop before SIGKILL
_MAX_LINE = 3000  # a message stays below the pipe's atomic write size, so ranks' lines never interleave


# ----------------------------------------------------------------------------------------- the decision
def launched() -> bool:
    """Whether this process is a rank of a torchrun launch (ours or a user's)."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def rank() -> int:
    """This process's rank in its launch (0 when not launched)."""
    return int(os.environ.get("RANK", "0"))


def current_world_size() -> int:
    """Processes in this process's launch (1 when not launched)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def world_size(model: ModelConfig) -> int:
    """How many processes a GPU stage should launch: 1 when this process is already a rank, else `model.gpus`
    (None: every visible CUDA device, or 1 without CUDA; on a machine without CUDA an explicit N means N processes on
    the CPU with the gloo backend, which is how the tests exercise this path).

    Raises:
        ConfigError: more GPUs asked for than are visible.
    """
    if launched():
        return 1
    import torch

    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if model.gpus is None:
        return max(visible, 1)
    if visible and model.gpus > visible:
        raise ConfigError(
            f"model.gpus is {model.gpus} but {visible} CUDA device(s) are visible; lower model.gpus or"
            " check CUDA_VISIBLE_DEVICES"
        )
    return model.gpus


def split_batch(per_device: int, accumulation: int, world: int, section: str) -> int:
    """The gradient accumulation per process that keeps the effective batch (per device x accumulation x world)
    equal to the recipe's on one GPU.

    Raises:
        ConfigError: the recipe's accumulation cannot be divided among `world` processes.
    """
    if accumulation % world:
        raise ConfigError(
            f"{section}: the effective batch {per_device} x {accumulation} = {per_device * accumulation} cannot be"
            f" split over {world} processes: {section}.gradient_accumulation_steps ({accumulation}) must be a multiple"
            f" of model.gpus ({world}); change either (e.g. per_device_train_batch_size x gradient_accumulation_steps"
            f" = {per_device * accumulation // world} x {world})"
        )
    return accumulation // world


# -------------------------------------------------------------------------------------------- the launcher
def launch(
    target: str,
    kwargs: dict[str, Any],
    *,
    nprocs: int,
    workdir: Path,
    description: str,
    progress: Progress | None = None,
    progress_from: Literal["rank0", "sum"] = "rank0",
    total: int | None = None,
) -> Any:
    """Run `target(**kwargs, progress=...)` (a "module:function" of the library) on `nprocs` ranks with torchrun;
    returns what rank 0's call returned (JSON).

    Args:
        target: the function each rank calls; it gets `kwargs` (JSON values) and a `progress` callable.
        kwargs: its arguments, as JSON values (configs as dicts, paths as strings).
        nprocs: the number of ranks (one per GPU).
        workdir: the stage's folder; the job files go to `<workdir>/.launch/` and are removed afterwards.
        description: how errors name the launch (the stage's name).
        progress: the stage's progress callable.
        progress_from: "rank0": rank 0's reports as they are (training: every rank is at the same step);
            "sum": each rank reports its own share and the launcher adds them up (sharded generation).
        total: with "sum", the total to report against.

    Raises:
        MathWizardError (or the rank's own subclass): a rank failed; the message is the rank's one line.
    """
    folder = Path(workdir) / JOB_DIR
    folder.mkdir(parents=True, exist_ok=True)
    job = folder / f"{target.rsplit(':', 1)[-1].strip('_')}-{os.getpid()}-{time.monotonic_ns()}.json"
    job.write_text(json.dumps({"target": target, "kwargs": kwargs}), encoding="utf-8")
    result_file = job.with_suffix(".result.json")
    command = dying_with_this_process(
        "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nprocs}", "--max-restarts=0",
        "-m", "mathwizard.launch", str(job),
    )  # fmt: skip
    env = {**os.environ, LAUNCHED_ENV: "1", "PYTHONUNBUFFERED": "1"}
    env.setdefault("OMP_NUM_THREADS", "1")  # torchrun would set it and warn; one thread per rank is its choice too
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    relay = _Relay(progress, progress_from, total)
    log.info("%s: starting %d processes (torchrun)", description, nprocs)
    try:
        with tempfile.TemporaryFile() as errors:  # a file, not a pipe: chatty ranks must never block on a full pipe
            process = subprocess.Popen(
                command,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=errors,
                start_new_session=True,  # a terminal's Ctrl-C reaches the launcher, which stops the group itself
            )
            try:
                assert process.stdout is not None
                for raw in process.stdout:
                    relay.line(raw.decode("utf-8", errors="replace").rstrip("\n"))
                code = process.wait()
            except BaseException:
                _stop(process)
                raise
            if code != 0:
                raise relay.error(description, code, _stderr_lines(errors))
        return json.loads(result_file.read_text(encoding="utf-8")) if result_file.is_file() else None
    finally:
        for path in (job, result_file):
            path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # another launch's files are still there
            folder.rmdir()


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM to torchrun and its ranks (one process group), then SIGKILL after the grace period."""
    for sig, wait in ((signal.SIGTERM, _GRACE_S), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _stderr_lines(errors: Any) -> list[str]:
    """What the ranks and torchrun wrote to stderr; the last 40 lines go to the debug log (tracebacks, `-vv`)."""
    errors.seek(0)
    lines = [line.strip() for line in errors.read().decode(errors="replace").splitlines() if line.strip()]
    if lines:
        log.debug("the ranks' last stderr lines:\n%s", "\n".join(lines[-40:]))
    return lines


def _first_death(lines: list[str]) -> tuple[int, str] | None:
    """From torchrun's failure summary, the rank that ended first and how: its "Root Cause" block names them. A rank
    that dies without a word (the OOM killer, a crash in native code) is otherwise hidden behind the ranks torchrun
    then stopped."""
    starts = [i for i, line in enumerate(lines) if line.startswith("Root Cause")]
    if not starts:
        return None
    block = "\n".join(lines[starts[-1] : starts[-1] + 10])
    found_rank, found_code = re.search(r"rank\s*:\s*(\d+)", block), re.search(r"exitcode\s*:\s*(-?\d+)", block)
    if not (found_rank and found_code):
        return None
    code = int(found_code.group(1))
    if code < 0:
        name = signal.Signals(-code).name if -code in signal.valid_signals() else f"signal {-code}"
        how = f"was killed by {name}"
        if -code == signal.SIGKILL:
            how += " (often the out-of-memory killer: lower the batch size)"
    else:
        how = f"exited with code {code}"
    return int(found_rank.group(1)), how


class _Relay:
    """Turns the ranks' marked lines into progress calls, log records and the first failure."""

    def __init__(self, progress: Progress | None, mode: str, total: int | None) -> None:
        self.progress, self.mode, self.total = progress, mode, total
        self.done: dict[int, int] = {}
        self.failure: dict[str, Any] | None = None

    def line(self, text: str) -> None:
        if not text.startswith(MARKER):
            if text.strip():
                log.debug("rank output: %s", text)
            return
        try:
            message = json.loads(text[len(MARKER) :])
        except ValueError:
            log.debug("rank output: %s", text)
            return
        kind = message.get("kind")
        if kind == "progress":
            self._progress(message)
        elif kind == "log":
            record = logging.makeLogRecord(
                {
                    "name": message["name"],
                    "levelno": message["level"],
                    "levelname": logging.getLevelName(message["level"]),
                    "msg": message["message"],
                }
            )
            logger = logging.getLogger(message["name"])
            if logger.isEnabledFor(record.levelno):
                logger.handle(record)
        elif kind == "error" and (self.failure is None or self.failure.get("type") == "KeyboardInterrupt"):
            self.failure = message  # the first real failure; the others' ranks were stopped because of it

    def _progress(self, message: dict[str, Any]) -> None:
        if self.progress is None:
            return
        metrics = message.get("metrics") or {}
        if self.mode == "rank0":
            if message.get("rank", 0) == 0:
                self.progress(message["done"], message["total"], **metrics)
            return
        self.done[message.get("rank", 0)] = message["done"]
        self.progress(sum(self.done.values()), self.total if self.total is not None else message["total"], **metrics)

    def error(self, description: str, code: int, stderr: list[str]) -> MathWizardError:
        failure, first = self.failure, _first_death(stderr)
        stopped = failure is None or failure.get("type") == "KeyboardInterrupt"  # no rank said what went wrong
        if stopped and first is not None and (failure is None or first[0] != failure.get("rank")):
            return MathWizardError(
                f"{description} on several processes failed: rank {first[0]} {first[1]} without reporting an error"
                " (its stderr: -vv)"
            )
        if failure is None:
            reason = (stderr[-1] if stderr else "") or f"exit code {code}"
            return MathWizardError(f"{description} on several processes failed: {reason}")
        from mathwizard import errors

        cls = getattr(errors, failure.get("type", ""), None)
        if isinstance(cls, type) and issubclass(cls, MathWizardError):
            return cls(failure["message"])
        return MathWizardError(
            f"{description} failed on rank {failure.get('rank', '?')}: {failure.get('type')}: {failure['message']}"
        )


# Runs first in torchrun's process: ask Linux for a SIGTERM when the launcher dies (even by kill -9), then become
# torchrun; torchrun passes a SIGTERM on to its ranks. (The same wrapper as the CLI's Prefect server's.)
# ------------------------------------------------------------------------------------------------- a rank
def _send(message: dict[str, Any]) -> None:
    text = MARKER + json.dumps(message, default=str)
    if len(text) > _MAX_LINE:
        text = _truncated(message)
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _truncated(message: dict[str, Any]) -> str:
    if "message" in message:
        message = {**message, "message": str(message["message"])[: _MAX_LINE // 2] + " ..."}
    return MARKER + json.dumps(message, default=str)


class _MarkerHandler(logging.Handler):
    """The library's log records of a rank, as marked lines for the launcher to re-log."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            _send({"kind": "log", "name": record.name, "level": record.levelno, "message": record.getMessage()})
        except Exception:  # a log line must never fail the training
            self.handleError(record)


def rank_progress(done: int, total: int, /, **metrics: float) -> None:
    """A rank's progress callable: one marked line per report."""
    _send({"kind": "progress", "rank": rank(), "done": done, "total": total, "metrics": metrics})


def main(argv: list[str]) -> int:
    """A rank: run the job's target with this rank's progress relay; rank 0 writes the result."""
    die_with_parent()  # torchrun: a rank ends with it
    job_file = Path(argv[0])
    job = json.loads(job_file.read_text(encoding="utf-8"))
    handler = _MarkerHandler(level=logging.INFO if rank() == 0 else logging.WARNING)
    library = logging.getLogger("mathwizard")
    library.addHandler(handler)
    library.setLevel(logging.INFO)
    library.propagate = False  # the launcher prints what it wants of these
    signal.signal(signal.SIGTERM, _terminated)
    try:
        if os.environ.get("LOCAL_RANK") is not None:
            import torch

            if torch.cuda.is_available():
                torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))  # before any model lands on "the" GPU
        module, name = job["target"].split(":")
        target: Callable[..., Any] = getattr(importlib.import_module(module), name)
        result = target(**job["kwargs"], progress=rank_progress)
    except BaseException as exc:
        traceback.print_exc()
        message = str(exc) or exc.__class__.__name__
        _send({"kind": "error", "rank": rank(), "type": exc.__class__.__name__, "message": message})
        return 130 if isinstance(exc, KeyboardInterrupt) else 1
    if rank() == 0:
        from mathwizard.manifest import atomic_write_text

        atomic_write_text(job_file.with_suffix(".result.json"), json.dumps(result, default=str))
    return 0


def _terminated(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"stopped by signal {signum}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
