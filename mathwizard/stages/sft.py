"""Supervised fine-tuning: image + question -> the teacher's solution, LoRA, loss on the answer only.

Usage: `mathwizard sft --data <run>/02-teach --out <run>/03-sft [--model tiny] [--backend auto|hf|unsloth]`.
Writes `adapter/` (PEFT adapter + processor + base-model pointer, loadable by `mathwizard.models.load_model`),
`merged/` when asked, `checkpoints/` (a killed run restarted with the same settings continues from the last one),
`metrics.jsonl`, `loss.png` and the manifest.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mathwizard.config import ModelConfig, SFTConfig
from mathwizard.manifest import Manifest, StageReport, fingerprint, require_manifest, reusable, stage_output
from mathwizard.progress import Progress

log = logging.getLogger(__name__)

STAGE = "sft"
VERSION = 1  # bump when output semantics change; part of the fingerprint


class Report(StageReport):
    """What an SFT run did: data, steps, parameters and losses."""

    train_rows: int
    val_rows: int
    steps: int
    resumed_from_step: int | None
    base_model: str
    backend: str
    device: str
    dtype: str
    trainable_parameters: int
    total_parameters: int
    train_loss: float | None
    final_loss: float | None
    eval_loss: float | None
    processes: int = 1  # data-parallel processes (GPUs) the run trained on

    def summary(self) -> str:
        return _training_summary(self.steps, self.train_rows, self.final_loss, self.eval_loss)


def _training_summary(steps: int, rows: int, loss: float | None, eval_loss: float | None) -> str:
    """`N steps on M rows, loss L, val loss V`: the line both training stages start their summary with."""
    line = f"{steps} steps on {rows:,} rows"
    line += f", loss {loss:.4f}" if loss is not None else ""
    return line + (f", val loss {eval_loss:.4f}" if eval_loss is not None else "")


def expected_fingerprint(cfg: SFTConfig, model: ModelConfig, data: Path) -> str:
    """Settings, the base model's identity, the training prompt and the teach output's fingerprint.

    Checks the inputs on the way, in one line each, before anything heavy starts (whether the backend can run here
    is checked first thing when there is training to do: a finished stage needs no GPU to be reused).

    Raises:
        ModelError: the model path does not exist.
        DataError: the teach folder is unfinished or damaged.
    """
    from mathwizard.models.ref import resolve
    from mathwizard.prompts import load_prompt

    base = resolve(model.name)
    teach = require_manifest(Path(data), "teach")
    return fingerprint(
        STAGE,
        VERSION,
        cfg,
        {teach.stage: teach.fingerprint},
        model=base.identity(model),
        prompt=load_prompt("tutor_system"),
    )


def _activate_backend(model: ModelConfig) -> None:
    """Import Unsloth now if the stage trains with it: Unsloth patches transformers and TRL when imported, and the
    stage's progress callback (a transformers TrainerCallback) is built before the trainer. `build_trainer` does the
    same, which is then a no-op."""
    from mathwizard.models import backend as backends

    backend = backends.resolve_backend(model.backend)
    backends.configure_compile(model.compile)
    backends.activate(backend)


def _trl_args(
    cfg: SFTConfig,
    output_dir: Path,
    *,
    backend: str = "hf",
    device: str = "cpu",
    dtype: str = "float32",
    has_eval: bool = True,
    world_size: int = 1,
) -> Any:
    """Our SFT settings as `trl.SFTConfig` (pure: no model, no data); `world_size` data-parallel processes share the
    recipe's effective batch."""
    import trl

    from mathwizard.training.args import common_args
    from mathwizard.training.parallel import data_parallel_args

    return trl.SFTConfig(
        **{
            **common_args(cfg, output_dir, backend=backend, device=device, dtype=dtype, has_eval=has_eval),
            **data_parallel_args(cfg, world_size, STAGE),
        },
        max_length=cfg.max_length,
        packing=False,
        completion_only_loss=True,  # the loss covers the solution, not the prompt or the image tokens
        pad_to_multiple_of=None,  # TRL's vision collator refuses it: training.padding pads its batches instead
        dataset_kwargs={"skip_prepare_dataset": True},  # images are processed batch by batch by the collator
    )


def build_trainer(
    cfg: SFTConfig, model: ModelConfig, data: Path, out: Path, *, callbacks: Sequence[Any] = ()
) -> tuple[Any, dict[str, Any]]:
    """The SFTTrainer over `data` writing checkpoints under `out`, and facts for the manifest.

    Raises:
        DataError: train split missing or empty, a column missing.
        ModelError: the model cannot be loaded or the backend cannot run here.
    """
    from mathwizard.data.splits import read_dataset
    from mathwizard.launch import current_world_size
    from mathwizard.models import backend as backends
    from mathwizard.models import load_model, resolve_backend
    from mathwizard.training import data as training_data
    from mathwizard.training.callbacks import tensorboard_callback
    from mathwizard.training.padding import pad_batches
    from mathwizard.training.runner import CHECKPOINTS_DIR, runtime

    backend = resolve_backend(model.backend)
    backends.configure_compile(model.compile)  # read by Unsloth at import: bounds compile time (docs/gpu.md)
    backends.activate(backend)  # Unsloth must patch transformers/TRL before they are imported
    train_rows = read_dataset(data, "train", training_data.SFT_COLUMNS, limit=cfg.limit)
    val_rows = read_dataset(data, "val", training_data.SFT_COLUMNS, required=False)
    device, dtype = runtime(model)

    import trl

    base, processor = load_model(
        model.name,
        backend,
        for_training=True,
        dtype=model.dtype,
        load_in_4bit=model.load_in_4bit,
        max_seq_length=cfg.max_length,
        kernels=model.kernels,
    )
    peft_model = backends.add_lora(
        base, cfg.lora, backend, seed=cfg.seed, gradient_checkpointing=cfg.gradient_checkpointing
    )
    train_ds = training_data.sft_records(train_rows)
    val_ds = training_data.sft_records(val_rows) if val_rows is not None else None
    args = _trl_args(
        cfg,
        Path(out) / CHECKPOINTS_DIR,
        backend=backend,
        device=device,
        dtype=dtype,
        has_eval=val_ds is not None,
        world_size=current_world_size(),
    )
    trainer = trl.SFTTrainer(
        model=peft_model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=val_ds,
        processing_class=processor,
        data_collator=backends.sft_collator(peft_model, processor, backend, max_length=cfg.max_length),
        callbacks=[*callbacks, *([tensorboard_callback(out)] if cfg.report_to == "tensorboard" else [])],
    )
    pad_batches(trainer, cfg.pad_to_multiple_of, processor, cfg.max_length)
    backends.compile_for_training(trainer.model, model.compile)  # model.compile=layers: its decoder layers
    facts = {
        "backend": backend,
        "device": device,
        "dtype": dtype,
        "train_rows": len(train_ds),
        "val_rows": len(val_ds) if val_ds is not None else 0,
    }
    return trainer, facts


def run(
    cfg: SFTConfig,
    model: ModelConfig,
    data: Path,
    out: Path,
    *,
    progress: Progress | None = None,
    callbacks: Sequence[Any] = (),
) -> Manifest:
    """Train LoRA adapters on the teach folder's train split (evaluated on val) and write them under `out`.

    Args:
        cfg: training and LoRA settings (defaults: the original recipe).
        model: base model and backend.
        data: the teach stage folder.
        out: this stage's folder.
        progress: called as `progress(step, max_steps)` after every optimizer step.
        callbacks: extra TrainerCallbacks (tests use one to interrupt a run).

    Returns:
        The manifest (also `out/manifest.json`); its report is a `Report`.

    Raises:
        DataError: the teach folder is unfinished or its train split is empty.
        ModelError: the model cannot be loaded, or `--backend unsloth` without CUDA.
    """
    from mathwizard.launch import launch, world_size
    from mathwizard.training.checkpoints import prepare_checkpoints
    from mathwizard.training.metrics import SFT_PLOTS
    from mathwizard.training.parallel import data_parallel_args, ranks_model
    from mathwizard.training.runner import CHECKPOINTS_DIR, list_outputs

    started = time.perf_counter()
    data, out = Path(data), Path(out)
    fp = expected_fingerprint(cfg, model, data)
    if (done := reusable(out, fp)) is not None:
        return done
    teach = require_manifest(data, "teach")
    world = world_size(model)
    data_parallel_args(cfg, world, STAGE)  # an effective batch that cannot be split fails before anything starts
    config = {"sft": cfg, "model": model}
    upstream = {teach.stage: teach.fingerprint}
    with stage_output(
        out, stage=STAGE, version=VERSION, fingerprint=fp, config=config, upstream=upstream, started=started
    ) as record:
        prepare_checkpoints(out / CHECKPOINTS_DIR, fp)
        if world > 1:
            if callbacks:
                raise ValueError("callbacks cannot reach the ranks of a launch; run them with model.gpus: 1")
            kwargs = {
                "cfg": cfg.model_dump(mode="json"),
                "model": ranks_model(model, world, STAGE).model_dump(mode="json"),
                "data": str(data),
                "out": str(out),
            }
            outcome = launch(
                f"{__name__}:_train_rank", kwargs, nprocs=world, workdir=out, description=STAGE, progress=progress
            )
        else:
            outcome = train_and_save(cfg, model, data, out, progress=progress, callbacks=callbacks)
        list_outputs(record, out, SFT_PLOTS)
        record.report(Report(**outcome, processes=world))
    return record.manifest


def train_and_save(
    cfg: SFTConfig,
    model: ModelConfig,
    data: Path,
    out: Path,
    *,
    progress: Progress | None = None,
    callbacks: Sequence[Any] = (),
) -> dict[str, Any]:
    """Train (resuming from the last checkpoint), evaluate, and on rank 0 write the adapter, merged model, metrics
    and plots; every rank of a launch runs this. Returns the report's fields (rank 0's are the ones used)."""
    _activate_backend(model)  # before the progress callback below imports transformers (Unsloth patches it)
    from mathwizard.models.ref import resolve
    from mathwizard.training.callbacks import progress_callback
    from mathwizard.training.metrics import SFT_PLOTS
    from mathwizard.training.runner import fit_and_save

    out = Path(out)
    extra_callbacks = [*callbacks, *([progress_callback(progress)] if progress is not None else [])]
    trainer, facts = build_trainer(cfg, model, data, out, callbacks=extra_callbacks)
    base_model = resolve(model.name).location
    fields, _ = fit_and_save(trainer, facts, out, SFT_PLOTS, merged=cfg.save_merged, base_model=base_model)
    return {**fields, "base_model": base_model}


def _train_rank(cfg: dict[str, Any], model: dict[str, Any], data: str, out: str, progress: Progress) -> dict[str, Any]:
    """One rank of a launch (`mathwizard.launch`): `train_and_save`, progress from rank 0 only."""
    from mathwizard.launch import rank

    return train_and_save(
        SFTConfig.model_validate(cfg),
        ModelConfig.model_validate(model),
        Path(data),
        Path(out),
        progress=progress if rank() == 0 else None,
    )
