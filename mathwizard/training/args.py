"""Trainer settings both stages share, as plain keyword arguments for `trl.SFTConfig` / `trl.DPOConfig`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from mathwizard.config import DPOConfig, SFTConfig

Device = Literal["cpu", "cuda"]


def common_args(
    cfg: SFTConfig | DPOConfig,
    output_dir: Path,
    *,
    backend: str,
    device: Device,
    dtype: str,
    has_eval: bool,
) -> dict[str, Any]:
    """Our stage settings as TrainingArguments keywords (CPU: no bf16, use_cpu; no workers).

    Args:
        cfg: the stage settings.
        output_dir: where checkpoints go (`<stage>/checkpoints`).
        backend: 'hf' or 'unsloth' (Unsloth does its own gradient checkpointing, so the Trainer must not).
        device: 'cpu' or 'cuda'.
        dtype: the model's weights dtype name ('float32', 'bfloat16', 'float16'); picks mixed precision on CUDA.
        has_eval: whether a validation split exists (periodic evaluation needs one).
    """
    periodic_eval = has_eval and cfg.eval_steps is not None
    on_cuda = device == "cuda"
    return {
        "output_dir": str(output_dir),
        "max_steps": cfg.max_steps if cfg.max_steps is not None else -1,  # -1: num_train_epochs decides
        "num_train_epochs": cfg.num_train_epochs,
        "per_device_train_batch_size": cfg.per_device_train_batch_size,
        "per_device_eval_batch_size": cfg.per_device_train_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "learning_rate": cfg.learning_rate,
        "lr_scheduler_type": cfg.lr_scheduler_type,
        "warmup_steps": cfg.warmup_steps,
        "weight_decay": cfg.weight_decay,
        "max_grad_norm": cfg.max_grad_norm,
        "optim": cfg.optim,
        "seed": cfg.seed,
        "data_seed": cfg.seed,
        "logging_steps": cfg.logging_steps,
        "save_strategy": "steps",
        "save_steps": cfg.save_steps,
        "save_total_limit": cfg.save_total_limit,
        "eval_strategy": "steps" if periodic_eval else "no",
        "eval_steps": cfg.eval_steps if periodic_eval else None,
        "bf16": on_cuda and dtype == "bfloat16",
        "fp16": on_cuda and dtype == "float16",
        "use_cpu": not on_cuda,
        "gradient_checkpointing": cfg.gradient_checkpointing and backend == "hf",
        "gradient_checkpointing_kwargs": {"use_reentrant": False} if backend == "hf" else None,
        # TensorBoard's writer is ours (training/callbacks.py), so its files land in the stage folder, not checkpoints/.
        "report_to": "none" if cfg.report_to == "tensorboard" else cfg.report_to,
        "dataloader_num_workers": 0,
        "remove_unused_columns": False,  # the vision collators need the raw images and messages
        "disable_tqdm": True,  # progress goes to the progress callback (CLI display, Prefect artifact)
    }
