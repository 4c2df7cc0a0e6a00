"""The pipeline deployment on a real Prefect server with process workers (slow: minutes on a 2-core CPU).

- The smoke pipeline runs on the cpu worker and sends its GPU stages to the cuda worker through `run_deployment`;
  every stage completes, and a headless Chromium renders the finished run's page with the stage names.
- The teacher API fails mid-way: the run fails; `prefect flow-run retry` completes it, sending only the requests
  whose replies were not cached yet.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from mathwizard.manifest import read_manifest
from mathwizard.stages import teach
from mathwizard.testing.openai_server import OpenAITestServer
from tests.flows.chromium import Browser, rendered

pytestmark = pytest.mark.slow

SMOKE = "smoke"
GPU = {
    "sft": "math-wizard-gpu-sft/sft-on-cuda",
    "pairs": "math-wizard-gpu-pairs/pairs-on-cuda",
    "dpo": "math-wizard-gpu-dpo/dpo-on-cuda",
    "eval": "math-wizard-gpu-eval/eval-on-cuda",
}
# Subflows of the pipeline run, in order: GPU stages appear as their deployments' flows.
STAGES = [
    "math-wizard-prepare",
    "math-wizard-teach",
    "math-wizard-gpu-sft",
    "math-wizard-gpu-pairs",
    "math-wizard-gpu-dpo",
    "math-wizard-gpu-eval",
    "math-wizard-gpu-eval",
    "math-wizard-gpu-eval",
    "math-wizard-publish",
]
STAGE_DIRS = ["01-prepare", "02-teach", "03-sft", "04-pairs", "05-dpo", "06-eval/base", "06-eval/sft", "06-eval/dpo"]


@pytest.fixture(scope="module")
def pipeline_run(prefect_stack, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """One finished smoke pipeline run with the GPU stages on the cuda pool; (flow run id, artifact root)."""
    home = tmp_path_factory.mktemp("pipeline") / "home"
    overrides = {"orchestration": {"gpu_deployments": GPU, "poll_seconds": 2}}
    run_id = prefect_stack.run(
        "math-wizard/smoke", {"params": {"recipe": SMOKE, "home": str(home), "advanced": overrides}}
    )
    run = prefect_stack.wait(run_id, timeout=1500)
    assert run["state_type"] == "COMPLETED", prefect_stack.logs(run_id)[-4000:] + prefect_stack.log_tail()
    return run_id, home


def test_pipeline_deployment_completes_every_stage(prefect_stack, pipeline_run) -> None:
    run_id, home = pipeline_run
    stages = prefect_stack.subflows(run_id)
    assert [s["flow"] for s in stages] == STAGES
    assert {s["state"] for s in stages} == {"Completed"}

    api = prefect_stack.stack.api
    for child in stages:
        run = api("GET", f"/flow_runs/{child['id']}").json()
        on_gpu_pool = child["flow"].startswith("math-wizard-gpu-")
        # GPU stages were runs of their deployments, picked up by the cuda worker; the rest ran inside the pipeline.
        assert (run["work_pool_name"] == "cuda") == on_gpu_pool, child
        if on_gpu_pool:
            [inner] = prefect_stack.subflows(child["id"])  # the stage's own flow, inside the GPU run
            assert inner["flow"] == child["flow"].replace("-gpu-", "-") and inner["state"] == "Completed"

    run_dir = home / "runs" / "smoke"
    manifests = {name: read_manifest(run_dir / name) for name in STAGE_DIRS}
    assert all(m is not None for m in manifests.values()), manifests
    # Each stage was made from the one before it.
    assert manifests["03-sft"].upstream["teach"] == manifests["02-teach"].fingerprint
    assert manifests["05-dpo"].upstream["pairs"] == manifests["04-pairs"].fingerprint
    assert (run_dir / "07-publish").is_dir()


def test_screenshot_of_the_finished_run_shows_the_stages(prefect_stack, pipeline_run, tmp_path: Path) -> None:
    browser = Browser(tmp_path / "profile", "1600,1400")
    run_id, _ = pipeline_run
    url = f"{prefect_stack.stack.ui_url}/runs/flow-run/{run_id}"
    text = browser.text(url)
    # The page opens on the run's logs, where the pipeline logs each stage (the timeline above them is a canvas).
    expected = ["Completed", "math-wizard", "smoke"]
    expected += [f"stage {name}: done" for name in ("prepare", "teach", "sft", "pairs", "dpo", "publish")]
    expected += [f"stage eval ({label}): done" for label in ("base", "sft", "dpo")]
    expected += ["starting on deployment math-wizard-gpu-sft/sft-on-cuda"]
    missing = [phrase for phrase in expected if phrase not in text]
    assert not missing, f"not on the rendered page: {missing}"
    assert rendered(browser.screenshot(url, "pipeline-flow-run.png", tmp_path))


def test_teacher_outage_fails_the_run_and_retry_sends_only_missing_requests(prefect_stack, tmp_path: Path) -> None:
    home = tmp_path / "home"
    overrides = {
        # The openai teacher against the local test server (its key is a dummy in the workers' environment).
        "teacher": {"kind": "openai", "concurrency": 2, "rpm": 60000, "request_retries": 1, "max_attempts": 1},
        "eval": {"models": ["sft"]},
    }
    with OpenAITestServer(latency=0.05) as server:
        overrides["teacher"]["base_url"] = server.base_url
        run_id = prefect_stack.run(
            "math-wizard/smoke", {"params": {"recipe": SMOKE, "home": str(home), "advanced": overrides}}
        )
        # Mid-way: once a third of the 60 items have been asked, the API goes down until we say otherwise.
        deadline = time.monotonic() + 300
        while server.requests < 20 and time.monotonic() < deadline:
            time.sleep(0.05)
        server.fail_for(3600, "503")
        failed = prefect_stack.wait(run_id, timeout=600)
        assert failed["state_type"] == "FAILED", prefect_stack.logs(run_id)[-3000:]
        answered = server.outcomes.get("ok", 0)
        assert 20 <= answered < 60
        assert read_manifest(home / "runs" / "smoke" / "02-teach") is None  # the stage did not finish

        server.clear()
        server.reset_counts()
        prefect_stack.stack.cli("flow-run", "retry", run_id)
        done = prefect_stack.wait_rerun(run_id, timeout=900)
        assert done["state_type"] == "COMPLETED", prefect_stack.logs(run_id)[-3000:]
        assert done["run_count"] >= 2
        # 60 items (51 train + 4 val + 5 test), `answered` of them cached before the outage: the rest, once each.
        assert server.requests == 60 - answered
        assert server.outcomes == {"ok": 60 - answered}

    taught = read_manifest(home / "runs" / "smoke" / "02-teach")
    assert teach.Report.of(taught).written == 60
    assert read_manifest(home / "runs" / "smoke" / "06-eval" / "sft") is not None  # the rest of the pipeline ran
