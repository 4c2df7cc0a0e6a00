"""Trainer callbacks of the project's own: training progress as `progress(step, max_steps, **latest metrics)`."""

from __future__ import annotations

import math
from typing import Any

from mathwizard.progress import Progress

# What a progress display shows of a training log (the DPO ones only exist in DPO logs).
SHOWN = ("loss", "eval_loss", "rewards/accuracies", "rewards/margins")


def progress_callback(progress: Progress) -> Any:
    """A TrainerCallback reporting every optimizer step, the resumed step at the start, and the latest metrics."""
    from transformers import TrainerCallback

    class StepProgress(TrainerCallback):
        def __init__(self) -> None:
            self.metrics: dict[str, float] = {}

        def _report(self, state: Any) -> None:
            progress(state.global_step, state.max_steps, **self.metrics)

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self._report(state)

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self._report(state)

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any):
            shown = {
                key.replace("rewards/", "reward_"): float(value)
                for key, value in (logs or {}).items()
                if key in SHOWN and isinstance(value, int | float) and math.isfinite(value)
            }
            if shown:
                self.metrics.update(shown)
                self._report(state)

    return StepProgress()
