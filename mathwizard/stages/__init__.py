"""The pipeline's stages, in order (`config.STAGE_DIRS`). Each module has STAGE, VERSION, a typed `Report` (with a
one-line `summary()`) and one public `run()` that decides by itself whether it has work to do."""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

from mathwizard.manifest import Manifest, StageReport

_MODULES = {"eval": "evaluate"}  # `eval` is a builtin's name


def module_name(stage: str) -> str:
    """The module name of `stage` under mathwizard.stages (and flows/): the stage's name, but `evaluate` for eval."""
    return _MODULES.get(stage, stage)


def stage_module(stage: str) -> ModuleType:
    """The library module of `stage` (imported when first asked for: stage modules import heavy libraries lazily)."""
    return importlib.import_module(f"mathwizard.stages.{module_name(stage)}")


def report_of(stage: str, manifest: Manifest | dict[str, Any]) -> StageReport:
    """The typed report of a stage's manifest."""
    return stage_module(stage).Report.of(manifest)
