"""Reading the artifacts the flows create, from the session's Prefect test API."""

from __future__ import annotations

import json
from typing import Any


def latest(key: str) -> Any:
    """The newest artifact with `key` (other tests in the session may write the same key)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    with get_client(sync_client=True) as client:
        (artifact,) = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])), sort=ArtifactSort.CREATED_DESC, limit=1
        )
    return artifact


def table(key: str) -> list[dict[str, Any]]:
    """The rows of the newest table artifact `key`."""
    data = latest(key).data
    return json.loads(data) if isinstance(data, str) else data


def of_run(state: Any) -> tuple[dict[str, Any], list[str]]:
    """The artifacts of the flow run behind `state` (key -> artifact) and its task runs' state names."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter, FlowRunFilterId

    run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]))
        )
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
    return {a.key: a for a in found}, [t.state.name for t in tasks]
