"""The deployment tests' fixture: a real Prefect server on 127.0.0.1 with process workers (S3: tests/conftest.py)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

# ------------------------------------------------------------------------------------- a real Prefect server
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


class Stack:
    """A running LocalStack plus the REST calls the tests need (no Prefect client in the test process)."""

    def __init__(self, stack, root: Path) -> None:
        self.stack, self.root = stack, root

    def run(self, deployment: str, parameters: dict | None = None) -> str:
        """Create a flow run of `flow/deployment`; returns its id."""
        dep = self.stack.api("GET", f"/deployments/name/{deployment}").json()
        run = self.stack.api(
            "POST", f"/deployments/{dep['id']}/create_flow_run", json={"parameters": parameters or {}}
        ).json()
        return run["id"]

    def flow_run(self, run_id: str) -> dict:
        return self.stack.api("GET", f"/flow_runs/{run_id}").json()

    def wait(self, run_id: str, timeout: float = 600) -> dict:
        """Poll until the run is final (the pytest timeout is the real guard); returns the run."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = self.flow_run(run_id)
            if run["state_type"] in FINAL and run["state_name"] != "AwaitingRetry":
                return run
            time.sleep(1)
        raise AssertionError(f"flow run {run_id} not final after {timeout} s: {run['state_name']}; {self.log_tail()}")

    def wait_rerun(self, run_id: str, timeout: float = 600) -> dict:
        """After `prefect flow-run retry`: wait for the run to leave its old final state, then for the new one."""
        deadline = time.monotonic() + timeout
        first = self.flow_run(run_id)["run_count"]
        while time.monotonic() < deadline:
            run = self.flow_run(run_id)
            if run["run_count"] > first or run["state_type"] not in FINAL:
                return self.wait(run_id, timeout=max(1.0, deadline - time.monotonic()))
            time.sleep(0.5)
        raise AssertionError(f"flow run {run_id} was not rescheduled within {timeout} s")

    def subflows(self, run_id: str) -> list[dict]:
        """Direct child flow runs (stages) in start order, as {name, flow, state}."""
        children = self.stack.api(
            "POST", "/flow_runs/filter", json={"flow_runs": {"parent_flow_run_id": {"any_": [run_id]}}}
        ).json()
        flows = {f["id"]: f["name"] for f in self.stack.api("POST", "/flows/filter", json={}).json()}
        children.sort(key=lambda r: r["start_time"] or r["expected_start_time"])
        return [
            {"name": r["name"], "flow": flows[r["flow_id"]], "state": r["state_name"], "id": r["id"]} for r in children
        ]

    def logs(self, run_id: str) -> str:
        rows = self.stack.api("POST", "/logs/filter", json={"logs": {"flow_run_id": {"any_": [run_id]}}}).json()
        return "\n".join(r["message"] for r in rows)

    def log_tail(self, lines: int = 40) -> str:
        text = ""
        for path in sorted(self.stack.logs.glob("*.log")):
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            text += f"\n--- {path.name}\n" + "\n".join(tail)
        return text


@pytest.fixture(scope="session")
def prefect_stack(tmp_path_factory: pytest.TempPathFactory, s3_endpoint: str) -> Iterator[Stack]:
    """A Prefect server on 127.0.0.1 (SQLite, own PREFECT_HOME), both pools, every deployment, a cpu and a cuda
    process worker (the cuda pool needs no GPU to exist; its stages run on CPU with the smoke recipe).

    The workers see the local S3 (its endpoint and test credentials are in the environment) and a dummy teacher
    key, and each has its own scratch folder, as two machines would."""
    from deployments.localstack import LocalStack

    root = tmp_path_factory.mktemp("stack")
    env = {
        "PREFECT_WORKER_QUERY_SECONDS": "2",
        "PREFECT_LOCAL_STORAGE_PATH": str(root / "results"),
        "MATHWIZARD_HOME": str(root / "home"),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "MATHWIZARD_TEACHER_API_KEY": "sk-test-dummy",  # only ever sent to the local test server
    }
    stack = LocalStack(home=root / "prefect", env=env)
    try:
        stack.start_server()
        stack.create_pools()
        stack.deploy()
        stack.set_schedules(False)  # as `mathwizard up` without --schedules
        stack.start_worker("cpu", MATHWIZARD_ORCHESTRATION__SCRATCH=str(root / "scratch-cpu"))
        stack.start_worker("cuda", MATHWIZARD_ORCHESTRATION__SCRATCH=str(root / "scratch-cuda"))
        yield Stack(stack, root)
    finally:
        stack.stop()
