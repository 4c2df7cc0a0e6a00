"""Prefect task for flawed-answer sampling (DPO pairs), cached on the library's own fingerprint."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from prefect import task

from mathwizard.config import ModelConfig, PairsConfig
from mathwizard.manifest import Manifest
from mathwizard.stages import pairs as stage
from tasks.common import fingerprint_key


def _key(cfg: PairsConfig, model: ModelConfig, sft: str, data: str, out: str, **_: object) -> str:
    # `progress` (a live UI callback) is not part of the key: it changes how the run is shown, not what it writes.
    return stage.expected_fingerprint(cfg, model, Path(sft), Path(data))


# No retries: re-running an OOM repeats it; a rerun resumes at the first unfinished chunk instead.
@task(name="pairs", cache_key_fn=fingerprint_key(_key), persist_result=True, retries=0)
def pairs(
    cfg: PairsConfig,
    model: ModelConfig,
    sft: str,
    data: str,
    out: str,
    progress: Callable[[int], None] | None = None,
) -> Manifest:
    """Sample and check flawed answers from the SFT model in `sft` for the teach output in `data`, into `out`."""
    return stage.run(cfg, model, Path(sft), Path(data), Path(out), progress=progress)
