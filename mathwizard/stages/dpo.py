"""Direct preference optimisation of the SFT model on the pairs, with the figure in every prompt.

Usage: `mathwizard dpo --model <run>/03-sft --pairs <run>/04-pairs --out <run>/05-dpo`.

How the SFT model becomes the starting point: the base model is loaded, the SFT adapter is put on it and
merged into the weights in memory, and a new LoRA adapter with DPO's own rank/alpha/dropout is trained on
top. The reference model is that merged SFT model itself (TRL disables the new adapter to compute it, so no
second copy is held). The saved `adapter/` therefore names the SFT adapter folder as its base, and
`load_model` rebuilds the chain: base -> SFT merged -> DPO adapter. `merged/` (when asked) is all three in one.

The images really reach the model: rows carry `images`, so TRL picks its vision preference collator and the
batch holds `pixel_values` (the original pinned a TRL that did not recognise gemma-3n and trained on text only).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mathwizard.config import DPOConfig, ModelConfig
from mathwizard.errors import DataError
from mathwizard.manifest import Manifest, StageReport, fingerprint, require_manifest, reusable, stage_output
from mathwizard.progress import Progress

log = logging.getLogger(__name__)

STAGE = "dpo"
VERSION = 1  # bump when output semantics change; part of the fingerprint


class Report(StageReport):
    """What a DPO run did: data, steps, parameters, losses and the final rewards."""

    train_rows: int
    val_rows: int
    dropped_long_prompts: int
    steps: int
    resumed_from_step: int | None
    base_model: str  # the model at the bottom of the adapter chain
    sft_adapter: str | None  # what the DPO adapter was trained on (None: DPO on the base model)
    backend: str
    device: str
    dtype: str
    trainable_parameters: int
    total_parameters: int
    train_loss: float | None
    final_loss: float | None
    eval_loss: float | None
    rewards_accuracies: float | None
    rewards_chosen: float | None
    rewards_rejected: float | None
    rewards_margins: float | None
    processes: int = 1  # data-parallel processes (GPUs) the run trained on

    def summary(self) -> str:
        from mathwizard.stages.sft import _training_summary

        line = _training_summary(self.steps, self.train_rows, self.final_loss, self.eval_loss)
        accuracy = self.rewards_accuracies
        return line + (f", reward accuracy {accuracy:.2f}" if accuracy is not None else "")


def _start(model: ModelConfig, sft: Path | None) -> Any:
    """The model DPO starts from: the SFT stage's adapter, or the base model when there is no SFT folder."""
    from mathwizard.models.ref import resolve

    return resolve(sft, adapter=True) if sft is not None else resolve(model.name)


def expected_fingerprint(cfg: DPOConfig, model: ModelConfig, sft: Path | None, pairs: Path) -> str:
    """Settings, the starting model's identity, the training prompt and the pairs' fingerprint.

    Checks the inputs on the way, in one line each, before anything heavy starts (whether the backend can run here
    is checked first thing when there is training to do: a finished stage needs no GPU to be reused).

    Raises:
        ModelError: the SFT folder holds no adapter.
        DataError: the pairs folder is unfinished or damaged.
    """
    from mathwizard.prompts import load_prompt

    start = _start(model, sft)
    pairs_manifest = require_manifest(Path(pairs), "pairs")
    upstream = {pairs_manifest.stage: pairs_manifest.fingerprint}
    return fingerprint(STAGE, VERSION, cfg, upstream, model=start.identity(model), prompt=load_prompt("tutor_system"))


def _trl_args(
    cfg: DPOConfig,
    output_dir: Path,
    *,
    backend: str = "hf",
    device: str = "cpu",
    dtype: str = "float32",
    has_eval: bool = True,
    world_size: int = 1,
) -> Any:
    """Our DPO settings as `trl.DPOConfig` (pure: no model, no data); `world_size` data-parallel processes share the
    recipe's effective batch."""
    import trl

    from mathwizard.training.args import common_args
    from mathwizard.training.parallel import data_parallel_args

    return trl.DPOConfig(
        **{
            **common_args(cfg, output_dir, backend=backend, device=device, dtype=dtype, has_eval=has_eval),
            **data_parallel_args(cfg, world_size, STAGE),
        },
        beta=cfg.beta,
        max_length=cfg.max_length,
        truncation_mode="keep_start",  # the only mode TRL allows with images: the prompt (and image) stay whole
        pad_to_multiple_of=None,  # TRL's vision collator refuses it: training.padding pads its batches instead
        precompute_ref_log_probs=False,
    )


def _records(rows: Any, processor: Any, max_prompt_length: int) -> tuple[Any, int]:
    from mathwizard.training.data import dpo_records, prompt_lengths

    records = dpo_records(rows)
    lengths = prompt_lengths(records, processor)
    keep = [i for i, n in enumerate(lengths) if n <= max_prompt_length]
    dropped = len(records) - len(keep)
    if dropped:
        log.warning("dropping %d pair(s) whose prompt is longer than max_prompt_length=%d", dropped, max_prompt_length)
        records = records.select(keep)
    return records, dropped


def build_trainer(
    cfg: DPOConfig,
    model: ModelConfig,
    sft: Path | None,
    pairs: Path,
    out: Path,
    *,
    callbacks: Sequence[Any] = (),
) -> tuple[Any, dict[str, Any]]:
    """The DPOTrainer (SFT merged + new LoRA, reference = adapter disabled) and facts for the manifest.

    Raises:
        DataError: train pairs missing or empty (or all longer than max_prompt_length).
        ModelError: the model cannot be loaded or the backend cannot run here.
    """
    import torch

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
    backends.patch_dpo(backend)
    train_rows = read_dataset(pairs, "train", training_data.DPO_COLUMNS, limit=cfg.limit)
    val_rows = read_dataset(pairs, "val", training_data.DPO_COLUMNS, required=False)
    device, dtype = runtime(model)

    import trl

    merged, processor = load_model(
        _start(model, sft).location,
        backend,
        for_training=True,
        dtype=model.dtype,
        load_in_4bit=model.load_in_4bit,
        max_seq_length=cfg.max_length,
        merge_adapter=True,  # the SFT weights become the policy's start and the reference
        kernels=model.kernels,
    )
    train_ds, dropped_train = _records(train_rows, processor, cfg.max_prompt_length)
    if len(train_ds) == 0:
        raise DataError(f"every train pair in {pairs} is longer than dpo.max_prompt_length={cfg.max_prompt_length}")
    val_ds, dropped_val = _records(val_rows, processor, cfg.max_prompt_length) if val_rows is not None else (None, 0)
    if val_ds is not None and len(val_ds) == 0:
        val_ds = None

    if backend == "unsloth":
        policy = backends.add_lora(
            merged, cfg.lora, backend, seed=cfg.seed, gradient_checkpointing=cfg.gradient_checkpointing
        )
        peft_config = None
    else:
        # TRL wraps the model itself; with ref_model=None it computes reference log-probs with the adapter off.
        policy, peft_config = merged, backends.lora_config(merged, cfg.lora)
    args = _trl_args(
        cfg,
        Path(out) / CHECKPOINTS_DIR,
        backend=backend,
        device=device,
        dtype=dtype,
        has_eval=val_ds is not None,
        world_size=current_world_size(),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)  # the new LoRA's random A matrices
        trainer = trl.DPOTrainer(
            model=policy,
            ref_model=None,
            args=args,
            train_dataset=train_ds,
            eval_dataset=val_ds,
            processing_class=processor,
            peft_config=peft_config,
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
        "dropped_long_prompts": dropped_train + dropped_val,
    }
    return trainer, facts


def run(
    cfg: DPOConfig,
    model: ModelConfig,
    sft: Path | None,
    pairs: Path,
    out: Path,
    *,
    progress: Progress | None = None,
    callbacks: Sequence[Any] = (),
) -> Manifest:
    """Align the SFT model with DPO on the pairs' train split (evaluated on val), writing under `out`.

    Args:
        cfg: DPO, training and LoRA settings (defaults: the original recipe).
        model: backend, dtype and 4-bit loading (its `name` is the base only when `sft` is None).
        sft: the SFT stage folder (or its adapter folder); None runs DPO on `model.name` directly.
        pairs: the pairs stage folder.
        out: this stage's folder.
        progress: called as `progress(step, max_steps)` after every optimizer step.
        callbacks: extra TrainerCallbacks (tests use one to interrupt a run).

    Returns:
        The manifest (also `out/manifest.json`); its report is a `Report`.

    Raises:
        DataError: the pairs folder is unfinished or its train split is empty.
        ModelError: the SFT folder holds no adapter, or `--backend unsloth` without CUDA.
    """
    from mathwizard.launch import launch, world_size
    from mathwizard.training.checkpoints import prepare_checkpoints
    from mathwizard.training.metrics import DPO_PLOTS
    from mathwizard.training.parallel import data_parallel_args, ranks_model
    from mathwizard.training.runner import CHECKPOINTS_DIR, list_outputs

    started = time.perf_counter()
    pairs, out = Path(pairs), Path(out)
    sft = Path(sft) if sft is not None else None
    fp = expected_fingerprint(cfg, model, sft, pairs)
    if (done := reusable(out, fp)) is not None:
        return done
    pairs_manifest = require_manifest(pairs, "pairs")
    start = _start(model, sft)
    upstream = {pairs_manifest.stage: pairs_manifest.fingerprint}
    if start.fingerprint:
        upstream[start.stage or "model"] = start.fingerprint
    world = world_size(model)
    data_parallel_args(cfg, world, STAGE)  # an effective batch that cannot be split fails before anything starts
    config = {"dpo": cfg, "model": model}
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
                "sft": str(sft) if sft is not None else None,
                "pairs": str(pairs),
                "out": str(out),
            }
            outcome = launch(
                f"{__name__}:_train_rank", kwargs, nprocs=world, workdir=out, description=STAGE, progress=progress
            )
        else:
            outcome = train_and_save(cfg, model, sft, pairs, out, progress=progress, callbacks=callbacks)
        list_outputs(record, out, DPO_PLOTS)
        record.report(Report(**outcome, processes=world))
    return record.manifest


def train_and_save(
    cfg: DPOConfig,
    model: ModelConfig,
    sft: Path | None,
    pairs: Path,
    out: Path,
    *,
    progress: Progress | None = None,
    callbacks: Sequence[Any] = (),
) -> dict[str, Any]:
    """Train (resuming from the last checkpoint), evaluate, and on rank 0 write the adapter, merged model, metrics
    and plots; every rank of a launch runs this. Returns the report's fields (rank 0's are the ones used)."""
    from mathwizard.stages.sft import _activate_backend

    _activate_backend(model)  # before the progress callback below imports transformers (Unsloth patches it)
    from mathwizard.training.callbacks import progress_callback
    from mathwizard.training.metrics import DPO_PLOTS, last_value
    from mathwizard.training.runner import fit_and_save

    out = Path(out)
    start = _start(model, sft)
    extra_callbacks = [*callbacks, *([progress_callback(progress)] if progress is not None else [])]
    trainer, facts = build_trainer(cfg, model, sft, pairs, out, callbacks=extra_callbacks)
    fields, history = fit_and_save(
        trainer, facts, out, DPO_PLOTS, merged=cfg.save_merged, base_model=start.location, root_model=start.root
    )
    return {
        **fields,
        "dropped_long_prompts": facts["dropped_long_prompts"],
        "base_model": start.root,
        "sft_adapter": start.location if sft is not None else None,
        "rewards_accuracies": last_value(history, "rewards/accuracies"),
        "rewards_chosen": last_value(history, "rewards/chosen"),
        "rewards_rejected": last_value(history, "rewards/rejected"),
        "rewards_margins": last_value(history, "rewards/margins"),
    }


def _train_rank(
    cfg: dict[str, Any], model: dict[str, Any], sft: str | None, pairs: str, out: str, progress: Progress
) -> dict[str, Any]:
    """One rank of a launch (`mathwizard.launch`): `train_and_save`, progress from rank 0 only."""
    from mathwizard.launch import rank

    return train_and_save(
        DPOConfig.model_validate(cfg),
        ModelConfig.model_validate(model),
        Path(sft) if sft is not None else None,
        Path(pairs),
        Path(out),
        progress=progress if rank() == 0 else None,
    )
