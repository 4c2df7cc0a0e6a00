"""Publish a run: the DPO model and the SFT and DPO datasets as Hub repos, or into a folder standing in for the Hub.

Usage: `mathwizard publish` (written locally), `mathwizard publish --push --namespace me` (uploaded; private unless
`--public`); library: `publish.run(settings.publish, run_dir, out)`.
Each repo is first laid out under `<root>/models/<repo_id>/` or `<root>/datasets/<repo_id>/`, where root is
`target` when set, else this stage's folder (`07-publish/`). Only with `publish.push` are those folders then pushed,
and then a Hub token is required; without it nothing leaves the machine, whatever token is at hand (HF_TOKEN,
`hf auth login`), so the pipeline completes offline and never uploads by surprise.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from mathwizard.config import PublishConfig
from mathwizard.errors import DataError, PublishError
from mathwizard.manifest import Manifest, StageReport, fingerprint, reusable, stage_output
from mathwizard.publish import hub
from mathwizard.publish.dataset_card import build_dataset_repo
from mathwizard.publish.lineage import RunInfo
from mathwizard.publish.model_card import build_model_repo, stale_evals

log = logging.getLogger(__name__)

STAGE = "publish"
VERSION = 1  # bump when the repo layout or the cards change meaning; part of the fingerprint

REPO_TYPES = {"model": "model", "sft_dataset": "dataset", "dpo_dataset": "dataset"}


class Repo(BaseModel):
    """One published repo: where it was laid out and, after an upload, where it went."""

    part: Literal["model", "sft_dataset", "dpo_dataset"]
    repo_id: str
    repo_type: Literal["model", "dataset"]
    private: bool
    folder: str = Field(description="The laid-out folder: relative to the stage folder when inside it, else absolute.")
    files: list[str]
    url: str | None = None
    commit: str | None = Field(None, description="The commit made by the upload; None when nothing changed.")
    uploaded: list[str] = Field(default_factory=list)
    deleted: list[str] = Field(default_factory=list)


class Report(StageReport):
    """Where the run was published."""

    destination: Literal["hub", "local"]
    endpoint: str | None
    root: str = Field(description="The folder the repos were laid out under.")
    repos: list[Repo]

    def summary(self) -> str:
        if self.destination == "hub":
            return f"{len(self.repos)} repos on {self.endpoint}: " + ", ".join(r.url or r.repo_id for r in self.repos)
        return f"{len(self.repos)} repos written under {self.root} ({NOT_UPLOADED})"


NOT_UPLOADED = "not uploaded: publish.push is false"


def destination(upload: bool) -> Literal["hub", "local"]:
    """Where the repos go, as part of the fingerprint: a run published locally is not yet on the Hub."""
    return "hub" if upload else "local"


def check_gate(cfg: PublishConfig, info: RunInfo) -> None:
    """With require_improvement, refuse a DPO model whose test accuracy is below the SFT model's.

    Raises:
        PublishError: the DPO model scores below SFT, a report is missing, or a report evaluated an older model.
    """
    if not cfg.require_improvement or "model" not in cfg.include:
        return
    missing = [name for name in ("sft", "dpo") if name not in info.evals]
    if missing:
        folders = ", ".join(f"06-eval/{name}/report.json" for name in missing)
        raise PublishError(
            f"publish.require_improvement needs {folders}; run `mathwizard eval` first or drop --require-improvement"
        )
    stale = stale_evals(info)
    if stale:
        raise PublishError(
            f"publish.require_improvement: the {', '.join(stale)} eval report(s) evaluated an earlier model;"
            " re-run `mathwizard eval`"
        )
    sft, dpo = info.evals["sft"], info.evals["dpo"]
    if dpo.accuracy < sft.accuracy:
        raise PublishError(
            f"publish.require_improvement: DPO accuracy {dpo.accuracy:.3f} is below SFT accuracy {sft.accuracy:.3f}"
            f" (n={dpo.n} / {sft.n}); not publishing the model (retrain, or drop --require-improvement)"
        )
    log.info("gate passed: DPO accuracy %.3f >= SFT accuracy %.3f", dpo.accuracy, sft.accuracy)


def run(
    cfg: PublishConfig, run_dir: Path, out: Path, *, token: str | None = None, token_block: str | None = None
) -> Manifest:
    """Lay out the model and dataset repos with their cards and, with `cfg.push`, push them.

    Args:
        cfg: publish settings (no secrets).
        run_dir: the run folder holding 01-prepare ... 06-eval.
        out: this stage's folder (07-publish); the repos are laid out here unless `cfg.target` is set.
        token: a Hub token from a Prefect Secret block; by default HF_TOKEN / MATHWIZARD_HF_TOKEN / the HF login.
            Read only with `cfg.push` and used only for the HTTP calls: never logged, written or put in the manifest.
        token_block: the Secret block's name, named in the error when push finds no token.

    Returns:
        The manifest; its report (a `Report`) lists each repo with its id, type, local folder and, after an
        upload, its URL, commit (None when nothing changed) and the files uploaded or deleted.

    Raises:
        DataError: an upstream stage folder is missing or incomplete.
        ConfigError: push without a token or with HF_HUB_OFFLINE set, push_merged without merged weights.
        PublishError: the gate refused the model, or the Hub refused an upload.
        TransientError: the Hub failed (5xx, 429) or could not be reached; a retry is safe.
    """
    started = time.perf_counter()
    run_dir, out = Path(run_dir), Path(out)
    if not run_dir.is_dir():
        raise DataError(f"run folder {run_dir} does not exist; pass --run-dir or run the pipeline first")
    info = RunInfo.read(run_dir)
    # Fail before anything is written or sent.
    for part, stage in (("model", "dpo"), ("sft_dataset", "teach"), ("dpo_dataset", "pairs")):
        if part in cfg.include:
            info.require(stage)
    check_gate(cfg, info)

    token = hub.resolve_token(token) if cfg.push else None  # not even looked for unless asked to push
    upload = hub.will_upload(cfg, token, token_block=token_block)
    fp = fingerprint(STAGE, VERSION, cfg, info.upstream(), destination=destination(upload))
    if (done := reusable(out, fp)) is not None:
        return done
    if not upload:
        log.info("writing the repos locally (%s; --push or publish.push: true uploads them)", NOT_UPLOADED)

    root = Path(cfg.target) if cfg.target else out
    repo_ids = {part: repo for part, repo in cfg.repo_ids().items() if part in cfg.include}
    datasets = {part: repo for part, repo in repo_ids.items() if part != "model"}
    with stage_output(
        out, stage=STAGE, version=VERSION, fingerprint=fp, config=cfg, upstream=info.upstream(), started=started
    ) as rec:
        for kind in ("models", "datasets"):  # our own folder holds only this publication's repos
            shutil.rmtree(out / kind, ignore_errors=True)
        folders: dict[str, Path] = {}
        repos: list[Repo] = []
        for part, repo_id in repo_ids.items():
            folder = folders[part] = root / f"{REPO_TYPES[part]}s" / repo_id
            _lay_out(folder, lambda tmp, part=part, repo_id=repo_id: _build(info, part, repo_id, tmp, cfg, datasets))
            files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
            where = _relative(folder, out)
            repos.append(
                Repo(
                    part=part,  # type: ignore[arg-type]
                    repo_id=repo_id,
                    repo_type=REPO_TYPES[part],  # type: ignore[arg-type]
                    private=cfg.private,
                    folder=where,
                    files=files,
                )
            )
            if not Path(where).is_absolute():  # inside the stage folder: checksums in the manifest too
                for rel in files:
                    rec.add_file(f"{where}/{rel}")
        endpoint = None
        if upload:
            assert token is not None  # will_upload() implies it
            api = hub.make_api(cfg, token)
            endpoint = api.endpoint
            message = f"Publish Math Wizard run {run_dir.name} ({fp[:12]})"
            for repo in repos:
                result = hub.push_folder(
                    api,
                    repo.repo_id,
                    repo.repo_type,
                    folders[repo.part],
                    private=cfg.private,
                    message=message,
                    delete_stale=cfg.delete_stale,
                )
                repo.url, repo.commit = result.url, result.commit
                repo.uploaded, repo.deleted = result.uploaded, result.deleted
        rec.report(Report(destination=destination(upload), endpoint=endpoint, root=str(root.resolve()), repos=repos))
    return rec.manifest


def _build(info: RunInfo, part: str, repo_id: str, folder: Path, cfg: PublishConfig, datasets: dict[str, str]) -> None:
    if part == "model":
        build_model_repo(info, repo_id, folder, cfg, datasets)
    else:
        build_dataset_repo(info, "sft" if part == "sft_dataset" else "dpo", repo_id, folder, cfg)


def _lay_out(folder: Path, build) -> None:
    """Build a repo folder beside its final place and swap it in, so it never mixes old and new files."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
    try:
        build(tmp)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _relative(folder: Path, out: Path) -> str:
    """The folder relative to the stage folder when inside it (portable manifest), else absolute."""
    try:
        return folder.resolve().relative_to(out.resolve()).as_posix()
    except ValueError:
        return str(folder.resolve())
