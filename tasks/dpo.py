"""Prefect task for DPO, cached on the library's own fingerprint."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from mathwizard.config import DPOConfig, ModelConfig
from mathwizard.manifest import Manifest
from mathwizard.stages import dpo as stage
from tasks.common import fingerprint_key


def _key(cfg: DPOConfig, model: ModelConfig, sft: str | None, pairs: str, out: str) -> str:
    return stage.expected_fingerprint(cfg, model, Path(sft) if sft else None, Path(pairs))


# No retries: re-running an OOM repeats it; a rerun resumes from the last checkpoint in out/checkpoints instead.
@task(name="dpo", cache_key_fn=fingerprint_key(_key), persist_result=True, retries=0)
def dpo(cfg: DPOConfig, model: ModelConfig, sft: str | None, pairs: str, out: str) -> Manifest:
    """Align the SFT model in `sft` with DPO on the pairs in `pairs`, into `out`."""
    return stage.run(cfg, model, Path(sft) if sft else None, Path(pairs), Path(out))
