"""Trainer callbacks of the project's own: training progress as `progress(step, max_steps)`."""

from __future__ import annotations

from typing import Any

from mathwizard.progress import Progress


def progress_callback(progress: Progress) -> Any:
    """A TrainerCallback reporting every optimizer step (and the resumed step at the start) to `progress`."""
    from transformers import TrainerCallback

    class StepProgress(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            progress(state.global_step, state.max_steps)

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            progress(state.global_step, state.max_steps)

    return StepProgress()
