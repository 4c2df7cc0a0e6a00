"""Prefect task for supervised fine-tuning, cached on the library's own fingerprint."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from mathwizard.config import ModelConfig, SFTConfig
from mathwizard.manifest import Manifest
from mathwizard.stages import sft as stage
from tasks.common import fingerprint_key


def _key(cfg: SFTConfig, model: ModelConfig, data: str, out: str) -> str:
    return stage.expected_fingerprint(cfg, model, Path(data))


# No retries: re-running an OOM repeats it; a rerun resumes from the last checkpoint in out/checkpoints instead.
@task(name="sft", cache_key_fn=fingerprint_key(_key), persist_result=True, retries=0)
def sft(cfg: SFTConfig, model: ModelConfig, data: str, out: str) -> Manifest:
    """Train the SFT LoRA adapter on the teach output in `data`, into `out`."""
    return stage.run(cfg, model, Path(data), Path(out))
