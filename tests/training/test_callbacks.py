"""Training progress as `progress(step, max_steps)`: at the start (the resumed step) and after every optimizer step."""

from __future__ import annotations

from types import SimpleNamespace

from mathwizard.training.callbacks import progress_callback


def test_progress_starts_at_the_resumed_step_and_reaches_the_total() -> None:
    seen: list[tuple[int, int]] = []
    callback = progress_callback(lambda done, total: seen.append((done, total)))
    callback.on_train_begin(None, SimpleNamespace(global_step=2, max_steps=4), None)  # resumed from checkpoint-2
    for step in (3, 4):
        callback.on_step_end(None, SimpleNamespace(global_step=step, max_steps=4), None)
    assert seen == [(2, 4), (3, 4), (4, 4)]
