"""Steps the SFT and DPO stages run alike: pick device and dtype, train with resume, save the adapter and plots."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from mathwizard.config import ModelConfig
from mathwizard.manifest import StageRecord
from mathwizard.training.checkpoints import checkpoint_step, last_checkpoint
from mathwizard.training.metrics import _finite, last_value, plot_metrics, write_metrics

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
ADAPTER_DIR = "adapter"
MERGED_DIR = "merged"
CHECKPOINTS_DIR = "checkpoints"


def runtime(model: ModelConfig) -> tuple[str, str]:
    """('cuda' | 'cpu', dtype name the weights load in); one torch thread for the tiny model on a CPU."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = model.dtype if model.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
    if device == "cpu" and model.name == "tiny":
        torch.set_num_threads(1)  # a tiny model on a busy CPU runs 10-100x faster on one thread
    return device, dtype


def base_model_id(name: str) -> str:
    """How an adapter names its base: 'tiny' and Hub ids as they are, local folders as absolute paths."""
    path = Path(name).expanduser()
    return str(path.resolve()) if name != "tiny" and path.is_dir() else name


def train(trainer: Any, checkpoints: Path) -> tuple[Any, int | None]:
    """trainer.train(), continuing from the last complete checkpoint when an earlier run was interrupted.

    A checkpoint that already reached the run's last step (killed after saving it, before the manifest) is loaded,
    not trained further: resuming there would train one step more than the settings ask for.
    """
    from transformers import PrinterCallback, TrainerState
    from transformers.trainer_utils import TrainOutput

    # disable_tqdm makes the Trainer print every log dict at INFO; progress goes to our callback, the numbers to
    # metrics.jsonl, so the log stays readable.
    trainer.remove_callback(PrinterCallback)
    resume = last_checkpoint(checkpoints)
    if resume is None:
        return trainer.train(), None
    state = TrainerState.load_from_json(str(resume / "trainer_state.json"))
    if state.max_steps > 0 and state.global_step >= state.max_steps:
        log.info("%s already holds the last step (%d); loading it without training", resume, state.global_step)
        trainer._load_from_checkpoint(str(resume))  # the adapter weights; the Trainer's own loader
        trainer.state = state
        losses = [entry["loss"] for entry in state.log_history if "loss" in entry]
        return TrainOutput(state.global_step, sum(losses) / len(losses) if losses else 0.0, {}), state.global_step
    log.info("resuming from %s", resume)
    if trainer.args.world_size > 1 and trainer.args.device.type == "cpu":
        # Several CPU processes (gloo, the tests): the Trainer's device is "cpu:0", which it passes to torch.load as
        # map_location for the optimizer state, and torch.load refuses that spelling; "cpu" is the same place.
        import torch

        trainer.args.__dict__["_setup_devices"] = torch.device("cpu")  # overrides the cached_property
    return trainer.train(resume_from_checkpoint=str(resume)), checkpoint_step(resume)


def final_evaluation(trainer: Any) -> dict[str, Any]:
    """Validation metrics at the last step: the periodic evaluation's when it just ran, else a fresh one."""
    if trainer.eval_dataset is None:
        return {}
    step = trainer.state.global_step
    for entry in reversed(trainer.state.log_history):
        if entry.get("step") == step and "eval_loss" in entry:
            return {k: v for k, v in entry.items() if k.startswith("eval_")}
    return trainer.evaluate()  # logged by the Trainer, so it lands in its log history and metrics.jsonl too


def _replace_dir(tmp: Path, target: Path) -> None:
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)


def save_adapter(model: Any, processor: Any, out: Path, *, base_model: str, backend: str, **extra: Any) -> Path:
    """`out/adapter/`: PEFT adapter, processor and the pointer to its base model (written whole or not at all)."""
    from mathwizard.models import write_adapter_pointer

    target = Path(out) / ADAPTER_DIR
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=".adapter-"))
    try:
        model.save_pretrained(str(tmp))
        processor.save_pretrained(str(tmp))
        write_adapter_pointer(tmp, base_model, backend, **extra)
        _replace_dir(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def save_merged(model: Any, processor: Any, out: Path, backend: str) -> Path:
    """`out/merged/`: the adapter merged into the base weights, a standalone model folder."""
    from mathwizard.models.backend import save_merged as write_merged

    target = Path(out) / MERGED_DIR
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=".merged-"))
    try:
        write_merged(model, processor, str(tmp), backend)
        _replace_dir(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def write_outputs(trainer: Any, out: Path, plots: tuple[tuple[str, str], ...]) -> list[dict[str, Any]]:
    """metrics.jsonl and the plots from the trainer's log history (rank 0 writes them); returns the records."""
    records = write_metrics(out / METRICS_FILE, trainer.state.log_history)
    plot_metrics(records, plots, out)
    return records


def list_outputs(record: StageRecord, out: Path, plots: tuple[tuple[str, str], ...]) -> None:
    """The stage's files (metrics, plots, adapter, merged; not checkpoints) in the manifest."""
    rows = len((out / METRICS_FILE).read_text(encoding="utf-8").splitlines())
    record.add_file(METRICS_FILE, rows=rows)
    for _, filename in plots:
        record.add_file(filename)
    for folder in (ADAPTER_DIR, MERGED_DIR):
        if (out / folder).is_dir():
            for path in sorted((out / folder).rglob("*")):
                if path.is_file():
                    record.add_file(str(path.relative_to(out)))


def trainable_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def fit_and_save(
    trainer: Any,
    facts: dict[str, Any],
    out: Path,
    plots: tuple[tuple[str, str], ...],
    *,
    merged: bool,
    base_model: str,
    **adapter_extra: Any,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Train (resuming from the last checkpoint) and evaluate on every rank; on rank 0 write the adapter, the merged
    model (`merged`), metrics and plots. Returns the report fields SFT and DPO share, and the log history."""
    trainable, total = trainable_parameters(trainer.model)
    result, resumed_from = train(trainer, out / CHECKPOINTS_DIR)
    eval_metrics = final_evaluation(trainer)  # every rank: evaluation is a collective
    if trainer.is_world_process_zero():
        processor, backend = trainer.processing_class, facts["backend"]
        save_adapter(trainer.model, processor, out, base_model=base_model, backend=backend, **adapter_extra)
        if merged:
            save_merged(trainer.model, trainer.processing_class, out, facts["backend"])
        write_outputs(trainer, out, plots)
    history = [_finite(entry) for entry in trainer.state.log_history]
    fields = {
        "train_rows": facts["train_rows"],
        "val_rows": facts["val_rows"],
        "steps": trainer.state.global_step,
        "resumed_from_step": resumed_from,
        "backend": facts["backend"],
        "device": facts["device"],
        "dtype": facts["dtype"],
        "trainable_parameters": trainable,
        "total_parameters": total,
        "train_loss": result.training_loss,
        "final_loss": last_value(history, "loss"),
        "eval_loss": eval_metrics.get("eval_loss"),
    }
    return fields, history
