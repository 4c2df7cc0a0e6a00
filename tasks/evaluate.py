"""Prefect task for evaluating one model (base, SFT or DPO), cached on the library's own fingerprint."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from prefect import task

from mathwizard.config import EvalConfig, ModelConfig
from mathwizard.manifest import Manifest
from mathwizard.stages import evaluate as stage
from tasks.common import fingerprint_key


def _key(cfg: EvalConfig, model: ModelConfig, data: str, out: str, label: str, **_: object) -> str:
    # `progress` (a live UI callback) is not part of the key: it changes how the run is shown, not what it writes.
    return stage.expected_fingerprint(cfg, model, Path(data), label)


# No retries: greedy decoding of the same model fails the same way twice.
@task(name="eval", cache_key_fn=fingerprint_key(_key), persist_result=True, retries=0)
def evaluate(
    cfg: EvalConfig,
    model: ModelConfig,
    data: str,
    out: str,
    label: str,
    progress: Callable[[int], None] | None = None,
) -> Manifest:
    """Evaluate `model` (its `name`: a Hub id, 'tiny', a model dir or a stage folder) on `data` into `out`."""
    return stage.run(cfg, model, Path(data), Path(out), label, progress=progress)
