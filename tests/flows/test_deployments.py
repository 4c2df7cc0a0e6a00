"""Against a real Prefect server on 127.0.0.1 with process workers: pools, deployments, and a flow run on a worker.

The session fixture (`prefect_stack`, ~25 s) starts the server, creates the pools, deploys deployments/prefect.yaml
and starts a cpu and a cuda worker, exactly as `mathwizard up` does.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from mathwizard.manifest import read_manifest

REPO = Path(__file__).resolve().parents[2]


def test_pools_and_deployments_match_prefect_yaml(prefect_stack) -> None:
    api = prefect_stack.stack.api
    pools = {p["name"]: p for p in api("POST", "/work_pools/filter", json={}).json()}
    assert {name: (p["type"], p["concurrency_limit"]) for name, p in pools.items() if name in ("cpu", "cuda")} == {
        "cpu": ("process", None),
        "cuda": ("process", 1),  # one GPU job at a time
    }

    flows = {f["id"]: f["name"] for f in api("POST", "/flows/filter", json={}).json()}
    deployed = {f"{flows[d['flow_id']]}/{d['name']}": d for d in api("POST", "/deployments/filter", json={}).json()}
    declared = yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())["deployments"]
    assert len(deployed) == len(declared) == 9  # 3 pipeline + 2 teacher-only + 4 GPU stages
    gpu = {name for name, d in deployed.items() if d["work_pool_name"] == "cuda"}
    assert gpu == {"mathwizard-sft/cuda", "mathwizard-pairs/cuda", "mathwizard-dpo/cuda", "mathwizard-eval/cuda"}
    weekly = deployed["math-wizard/gemma-3n-e2b"]["schedules"]
    assert [(s["schedule"]["cron"], s["active"]) for s in weekly] == [("0 3 * * 1", True)]
    # Every recipe a deployment names exists (the recipes test validates their content).
    for d in deployed.values():
        recipe = (d["parameters"].get("params") or {}).get("recipe")
        if recipe:
            assert (REPO / recipe).is_file(), recipe
    # The GPU settings of the real recipe point at deployments that exist.
    from mathwizard.config import load_settings

    real = load_settings(REPO / "deployments" / "recipes" / "gemma-3n-e2b.yaml")
    assert set(real.orchestration.gpu_deployments.values()) == gpu


def test_teacher_deployment_runs_on_a_cpu_worker(prefect_stack, tmp_path: Path) -> None:
    home = tmp_path / "home"
    run_id = prefect_stack.run(
        "math-wizard-teacher/smoke", {"params": {"recipe": "deployments/recipes/smoke.yaml", "home": str(home)}}
    )
    run = prefect_stack.wait(run_id, timeout=300)
    assert run["state_type"] == "COMPLETED", prefect_stack.logs(run_id) + prefect_stack.log_tail()
    assert run["work_pool_name"] == "cpu"
    stages = prefect_stack.subflows(run_id)
    assert [(s["flow"], s["state"]) for s in stages] == [("prepare", "Completed"), ("teach", "Completed")]

    prepared = read_manifest(home / "runs" / "smoke" / "01-prepare")
    taught = read_manifest(home / "runs" / "smoke" / "02-teach")
    assert taught.upstream.get("prepare") == prepared.fingerprint
