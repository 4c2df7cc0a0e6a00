"""The publish flow: the model and both datasets to the Hub (or a local folder), with an artifact listing them.

Usage: `mathwizard publish [--push --namespace me]` or `publish_flow(settings=load_settings())`.
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.artifacts import create_link_artifact, create_markdown_artifact

from mathwizard.config import Settings
from mathwizard.stages.publish import NOT_UPLOADED, Report
from tasks.stages import publish


@flow(name="math-wizard-publish", flow_run_name="publish")
def publish_flow(settings: Settings, run_dir: str | None = None, out: str | None = None) -> dict[str, Any]:
    """Publish the run in `run_dir` (default: the run's folder); `out` defaults to its `07-publish` folder."""
    run_dir = run_dir or settings.run_dir
    out = out or settings.stage_dir("publish")
    manifest = publish(settings.publish, run_dir, out)
    report = Report.of(manifest)
    create_markdown_artifact(markdown=summary_markdown(report), key="publish-summary", description="Published repos")
    for repo in report.repos:
        if repo.url:
            key = f"publish-{repo.part.replace('_', '-')}"
            create_link_artifact(link=repo.url, link_text=repo.repo_id, key=key, description=repo.part)
    return manifest.model_dump(mode="json")


def summary_markdown(report: Report) -> str:
    """One row per repo: where it went, how many files, and the commit (or why there was none)."""
    uploaded = report.destination == "hub"
    where = f"uploaded to {report.endpoint}" if uploaded else f"written to `{report.root}` ({NOT_UPLOADED})"
    lines = [f"### Publish: {where}", "", "| repo | type | files | location | commit |", "|---|---|---|---|---|"]
    for repo in report.repos:
        location = f"[{repo.repo_id}]({repo.url})" if repo.url else f"`{repo.folder}`"
        if not uploaded:
            commit = "–"
        elif repo.commit:
            commit = f"`{repo.commit[:12]}` ({len(repo.uploaded)} uploaded, {len(repo.deleted)} deleted)"
        else:
            commit = "none: already up to date"
        lines.append(f"| {repo.repo_id} | {repo.repo_type} | {len(repo.files)} | {location} | {commit} |")
    return "\n".join(lines) + "\n"
