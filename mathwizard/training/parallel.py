"""SFT and DPO on several GPUs: what changes in the trainer's settings, and how a stage hands its training to ranks.

Data-parallel training is transformers' own: the Trainer, started by torchrun (`mathwizard.launch`), reads
LOCAL_RANK / WORLD_SIZE, wraps the model in DDP and gives each rank its share of every batch (accelerate's sharded
sampler over one seeded permutation). What is ours is the arithmetic that keeps the recipe's effective batch:
per device x accumulation x processes stays what it is on one GPU, so the accumulation is divided by the number of
processes. Steps, learning-rate schedule and checkpoints are counted in optimizer steps of that effective batch, so a
checkpoint written on one GPU resumes on two and the reverse (the Trainer skips `global_step x effective batch`
examples of the same permutation either way).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from mathwizard.launch import split_batch

if TYPE_CHECKING:
    from mathwizard.config import DPOConfig, ModelConfig, SFTConfig

log = logging.getLogger(__name__)


def data_parallel_args(cfg: SFTConfig | DPOConfig, world: int, section: str) -> dict[str, Any]:
    """TrainingArguments keywords for `world` data-parallel processes (none for one).

    Raises:
        ConfigError: the effective batch cannot be split over `world` processes.
    """
    if world <= 1:
        return {}
    return {
        "gradient_accumulation_steps": split_batch(
            cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps, world, section
        ),
        # LoRA leaves most weights frozen; every adapted module takes part in every step (an image in every row),
        # so DDP need not search the graph for unused parameters each step.
        "ddp_find_unused_parameters": False,
    }


def ranks_model(model: ModelConfig, world: int, stage: str) -> ModelConfig:
    """The model settings the training ranks use: the hf backend when Unsloth would run on several GPUs.

    Unsloth's FastVisionModel is a single-GPU path here (its patched trainer and compiled modules are not exercised
    under DDP in this project); on several GPUs the stage trains with transformers + PEFT + TRL instead, and says so.
    """
    if world <= 1:
        return model
    from mathwizard.models import resolve_backend

    if resolve_backend(model.backend) == "unsloth":
        log.warning("%s: Unsloth trains on one GPU only here; training on %d GPUs with the hf backend", stage, world)
        return model.model_copy(update={"backend": "hf"})
    return model
