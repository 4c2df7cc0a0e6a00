"""Trainer callbacks of the project's own: training progress as `progress(step, max_steps, **latest metrics)`, and
the TensorBoard writer in the stage folder."""

from __future__ import annotations

import math
from pathlib import Path
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


TENSORBOARD_DIR = "tensorboard"


def tensorboard_callback(out: Path) -> Any:
    """transformers' TensorBoard callback writing event files to `<stage>/tensorboard` (`tensorboard --logdir`).

    Raises:
        ConfigError: the tensorboard package is missing.
    """
    from mathwizard.errors import ConfigError

    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("report_to: tensorboard needs the tensorboard package; pip install tensorboard") from None
    from transformers.integrations import TensorBoardCallback

    return TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(Path(out) / TENSORBOARD_DIR)))
