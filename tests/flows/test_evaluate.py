"""The eval flow: a run named after its label, progress as batches are scored (also when a batch fails), the
model's table and the run's base/SFT/DPO table; a finished evaluation is skipped by its manifest."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import pytest

from mathwizard.config import load_settings
from mathwizard.errors import ConfigError, ModelError
from mathwizard.generation import Completion, Request, SamplingParams
from mathwizard.stages import evaluate
from tests.flows.artifacts import latest, of_run, table
from tests.stages.eval_data import FakeGenerator, make_data


class BrokenGenerator(FakeGenerator):
    """Like FakeGenerator until its `fail_on_call`-th call, which raises (the flow run fails)."""

    def __init__(self, fail_on_call: int | None = None) -> None:
        super().__init__()
        self.fail_on_call = fail_on_call

    def __call__(self, requests: Sequence[Request], params: SamplingParams) -> list[Completion]:
        if self.fail_on_call == len(self.calls) + 1:
            raise ModelError("CUDA out of memory")
        return super().__call__(requests, params)


def test_flow_progress_failed_done_and_skipped(
    prefect_harness: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows.evaluate import eval_flow

    data = str(make_data(tmp_path / "02-teach"))
    settings = load_settings(home=str(tmp_path / "home"), eval={"batch_size": 4})
    real_run = evaluate.run

    def flow_with(generator: FakeGenerator):
        monkeypatch.setattr(evaluate, "run", functools.partial(real_run, generator=generator))
        return eval_flow(settings, model="tiny", data=data, label="sft", return_state=True)

    # The 2nd batch fails: 4 of 6 problems were scored -> 4 / 6 = 66.7 %.
    failed = flow_with(BrokenGenerator(fail_on_call=2))
    assert failed.is_failed()
    found, tasks = of_run(failed)
    assert round(float(found["eval-sft-progress"].data), 1) == 66.7 and tasks == ["Failed"]
    assert found["eval-sft-progress"].description == "eval (sft on test): problems: 4 of 6"

    # A full run (an evaluation does not resume: all 6 again, in batches 4 + 2).
    fake = BrokenGenerator()
    done = flow_with(fake)
    assert done.is_completed() and [len(requests) for requests, _ in fake.calls] == [4, 2]
    found, tasks = of_run(done)
    assert float(found["eval-sft-progress"].data) == 100.0 and tasks == ["Completed"]
    assert found["eval-sft-progress"].description == "eval (sft on test): problems: 6 of 6"
    manifest = done.result()
    assert Path(settings.stage_dir("eval"), "sft", "report.json").is_file()  # 06-eval/<label> by default
    assert table("eval-sft") == [
        {
            "model": "sft",
            "n": 5,
            "accuracy": 0.6,
            "format_rate": 0.6,
            "accuracy_easy": 1.0,
            "accuracy_medium": 0.5,
            "accuracy_hard": 0.0,
        }
    ]
    assert "| sft | 5 | 60.0% |" in latest("eval-table").data  # the run's table so far: sft only

    # Done already: the stage's manifest answers before any generate call, and no progress artifact appears.
    skipped = flow_with(BrokenGenerator(fail_on_call=1))
    assert skipped.is_completed() and skipped.result() == manifest
    found, tasks = of_run(skipped)
    assert "eval-sft-progress" not in found and tasks == ["Completed"]


def test_flow_runs_are_named_after_their_label(prefect_harness: None, tmp_path: Path, monkeypatch) -> None:
    from prefect.client.orchestration import get_client

    from flows.evaluate import eval_flow

    data = str(make_data(tmp_path / "02-teach"))
    settings = load_settings(home=str(tmp_path / "home"))
    monkeypatch.setattr(evaluate, "run", functools.partial(evaluate.run, generator=FakeGenerator()))
    state = eval_flow(settings, model="tiny", data=data, label="base", return_state=True)
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(state.state_details.flow_run_id)
    assert run.name == "eval-base"
    assert Path(settings.stage_dir("eval"), "base", "manifest.json").is_file()
    with pytest.raises(ConfigError, match="label 'best' names no stage model; pass --model or use one of base"):
        eval_flow(settings, data=data, label="best")
