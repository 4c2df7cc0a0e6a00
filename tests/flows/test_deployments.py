"""Against a real Prefect server on 127.0.0.1 with process workers: pools, deployments, and a flow run on a worker.

The session fixture (`prefect_stack`, ~25 s) starts the server, creates the pools, deploys deployments/prefect.yaml
(schedules off) and starts a cpu and a cuda worker, exactly as `mathwizard up` does.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mathwizard.manifest import read_manifest
from tests.flows.chromium import Browser, rendered

REPO = Path(__file__).resolve().parents[2]


DEPLOYMENTS = {
    "math-wizard/smoke": "cpu",
    "math-wizard/defaults": "cpu",
    "math-wizard/gemma-3n-e2b": "cpu",
    "math-wizard-data/smoke-data": "cpu",
    "math-wizard-data/gemma-3n-e2b-data": "cpu",
    "math-wizard-gpu-sft/sft-on-cuda": "cuda",
    "math-wizard-gpu-pairs/pairs-on-cuda": "cuda",
    "math-wizard-gpu-dpo/dpo-on-cuda": "cuda",
    "math-wizard-gpu-eval/eval-on-cuda": "cuda",
}


def _deployed(api) -> dict[str, dict]:
    flows = {f["id"]: f["name"] for f in api("POST", "/flows/filter", json={}).json()}
    return {f"{flows[d['flow_id']]}/{d['name']}": d for d in api("POST", "/deployments/filter", json={}).json()}


def test_pools_and_deployments_match_prefect_yaml(prefect_stack) -> None:
    api = prefect_stack.stack.api
    pools = {p["name"]: p for p in api("POST", "/work_pools/filter", json={}).json()}
    assert {name: (p["type"], p["concurrency_limit"]) for name, p in pools.items() if name in ("cpu", "cuda")} == {
        "cpu": ("process", None),
        "cuda": ("process", 1),  # one GPU job at a time
    }

    deployed = _deployed(api)
    declared = yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())["deployments"]
    assert {name: d["work_pool_name"] for name, d in deployed.items()} == DEPLOYMENTS
    # Unique deployment names (`prefect deploy --name X` is never ambiguous), one style of flow name.
    assert len({d["name"] for d in declared}) == len(declared) == len(deployed) == 9
    assert all(name.startswith("math-wizard") and name.split("/")[0].islower() for name in deployed)
    # The real pipeline: one run at a time, a second one waits; its weekly schedule is deployed off.
    real = deployed["math-wizard/gemma-3n-e2b"]
    assert real["global_concurrency_limit"]["limit"] == 1
    assert real["concurrency_options"]["collision_strategy"] == "ENQUEUE"
    assert [(s["schedule"]["cron"], s["active"]) for s in real["schedules"]] == [("0 3 * * 1", False)]
    assert [name for name, d in deployed.items() if d["schedules"]] == ["math-wizard/gemma-3n-e2b"]
    # Every deployment of the pipeline names a shipped recipe or none (the recipes test validates their content).
    for d in deployed.values():
        recipe = (d["parameters"].get("params") or {}).get("recipe")
        assert recipe is None or (REPO / "deployments" / "recipes" / f"{recipe}.yaml").is_file(), recipe
    # The GPU settings of the real recipe point at deployments that exist.
    from mathwizard.config import load_settings

    real_recipe = load_settings(REPO / "deployments" / "recipes" / "gemma-3n-e2b.yaml")
    gpu = {name for name, pool in DEPLOYMENTS.items() if pool == "cuda"}
    assert set(real_recipe.orchestration.gpu_deployments.values()) == gpu


def test_the_run_form_is_the_typed_model(prefect_stack) -> None:
    """The deployment's form is PipelineParams as the flow declares it, with the smoke recipe chosen."""
    from flows.pipeline import math_wizard

    smoke = _deployed(prefect_stack.stack.api)["math-wizard/smoke"]
    assert smoke["parameter_openapi_schema"] == math_wizard.parameters.model_dump(exclude={"required"})
    assert smoke["parameters"] == {"params": {"recipe": "smoke"}}
    assert smoke["enforce_parameter_schema"]  # the server refuses parameters the form would not allow


def test_schedules_are_switched_on_only_when_asked(prefect_stack) -> None:
    stack = prefect_stack.stack

    def active() -> dict[str, list[bool]]:
        return {n: [s["active"] for s in d["schedules"]] for n, d in _deployed(stack.api).items() if d["schedules"]}

    assert active() == {"math-wizard/gemma-3n-e2b": [False]}
    try:
        assert stack.set_schedules(True) == ["math-wizard/gemma-3n-e2b"]  # what `mathwizard up --schedules` does
        assert active() == {"math-wizard/gemma-3n-e2b": [True]}
    finally:
        stack.set_schedules(False)
    assert active() == {"math-wizard/gemma-3n-e2b": [False]}


def test_prefect_deploy_works_from_the_deployments_folder_and_fails_in_one_message_elsewhere(
    prefect_stack, tmp_path: Path
) -> None:
    stack = prefect_stack.stack
    before = _deployed(stack.api)["math-wizard/smoke"]["updated"]
    output = stack.cli("deploy", "--name", "smoke", cwd=REPO / "deployments")  # `cd deployments && prefect deploy`
    assert "math-wizard/smoke" in output and _deployed(stack.api)["math-wizard/smoke"]["updated"] != before

    import subprocess

    from deployments.localstack import prefect_command

    elsewhere = subprocess.run(
        [*prefect_command(), "--no-prompt", "deploy", "--all"],
        cwd=tmp_path,  # no prefect.yaml here
        env=stack.child_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    said = elsewhere.stdout + elsewhere.stderr
    assert elsewhere.returncode != 0 and "Traceback" not in said and "entrypoint must be provided" in said


def test_data_deployment_runs_on_a_cpu_worker(prefect_stack, tmp_path: Path) -> None:
    home = tmp_path / "home"
    run_id = prefect_stack.run("math-wizard-data/smoke-data", {"params": {"recipe": "smoke", "home": str(home)}})
    run = prefect_stack.wait(run_id, timeout=300)
    assert run["state_type"] == "COMPLETED", prefect_stack.logs(run_id) + prefect_stack.log_tail()
    assert run["work_pool_name"] == "cpu"
    stages = prefect_stack.subflows(run_id)
    assert [(s["flow"], s["state"]) for s in stages] == [
        ("math-wizard-prepare", "Completed"),
        ("math-wizard-teach", "Completed"),
    ]

    prepared = read_manifest(home / "runs" / "smoke" / "01-prepare")
    taught = read_manifest(home / "runs" / "smoke" / "02-teach")
    assert taught.upstream.get("prepare") == prepared.fingerprint


@pytest.mark.slow
def test_screenshot_of_the_run_form(prefect_stack, tmp_path: Path) -> None:
    """The smoke deployment's Run form in a headless Chromium: the typed fields, the recipe choice, no `<home>` lost."""
    browser = Browser(tmp_path / "profile", "1400,2400")
    smoke = _deployed(prefect_stack.stack.api)["math-wizard/smoke"]
    url = f"{prefect_stack.stack.ui_url}/deployments/deployment/{smoke['id']}/run"
    text = browser.text(url)
    expected = ["Recipe", "Recipe File", "Run Name", "Base Model", "Sft Max Steps", "Teacher Model", "Advanced"]
    expected += ["Folder of this run under home/runs", "smoke: the whole pipeline in minutes on a CPU"]
    missing = [phrase for phrase in expected if phrase not in text]
    assert not missing, f"not on the rendered form: {missing}"
    assert rendered(browser.screenshot(url, "pipeline-run-form.png", tmp_path))


def test_the_stacks_api_asks_a_busy_server_again_and_raises_what_it_still_refuses(monkeypatch) -> None:
    """Under load the server answers 503 (its SQLite locked, the request not applied): asked again with backoff, as
    Prefect's own client does; a refusal (4xx other than 429) or a server still busy after the retries raises."""
    import httpx
    import tenacity

    from deployments import localstack

    monkeypatch.setattr(localstack._request_until_served.retry, "wait", tenacity.wait_none())
    answers: list[int] = []

    def server(statuses):
        def request(method, url, **_):
            status = statuses[min(len(answers), len(statuses) - 1)]
            answers.append(status)
            return httpx.Response(status, json={}, request=httpx.Request(method, url))

        return request

    stack = localstack.LocalStack.__new__(localstack.LocalStack)
    monkeypatch.setattr(localstack.LocalStack, "api_url", "http://127.0.0.1:1/api")
    monkeypatch.setattr(httpx, "request", server([503, 429, 201]))
    assert stack.api("POST", "/deployments/x/create_flow_run").status_code == 201 and answers == [503, 429, 201]
    answers.clear()
    monkeypatch.setattr(httpx, "request", server([409]))
    with pytest.raises(httpx.HTTPStatusError):
        stack.api("POST", "/x")
    assert answers == [409]  # a refusal is not asked again
    answers.clear()
    monkeypatch.setattr(httpx, "request", server([503]))
    with pytest.raises(httpx.HTTPStatusError):
        stack.api("GET", "/x")
    assert answers == [503] * 6
