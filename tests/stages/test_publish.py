"""The publish stage offline: the local layout, the evaluation gate, upstream checks, fingerprints and skipping."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from mathwizard.config import PublishConfig
from mathwizard.errors import ConfigError, DataError, PublishError
from mathwizard.manifest import read_manifest
from mathwizard.stages import publish
from tests.publish.fakehub import TOKEN
from tests.publish.synthetic import make_run

MODEL, SFT, DPO = "math-wizard/math-wizard-gemma-3n-dpo", "math-wizard/math-wizard-sft", "math-wizard/math-wizard-dpo"


pytestmark = pytest.mark.usefixtures("no_hub_login")


def _files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def test_without_a_token_the_repos_are_written_into_the_stage_folder(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "07-publish"

    manifest = publish.run(PublishConfig(), run_dir, out)

    files = _files(out)
    assert len([f for f in files if f.startswith(f"models/{MODEL}/")]) == 18  # see test_hub_upload.MODEL_FILES
    assert [f for f in files if f.startswith("datasets/")] == [
        f"datasets/{DPO}/README.md",
        f"datasets/{DPO}/data/train-00000-of-00001.parquet",
        f"datasets/{DPO}/data/validation-00000-of-00001.parquet",
        f"datasets/{SFT}/README.md",
        f"datasets/{SFT}/data/test-00000-of-00001.parquet",
        f"datasets/{SFT}/data/train-00000-of-00001.parquet",
        f"datasets/{SFT}/data/validation-00000-of-00001.parquet",
    ]
    assert len(files) == 18 + 7 + 1  # model + datasets + manifest.json
    report = publish.Report.of(manifest)
    assert (report.destination, report.endpoint, report.root) == ("local", None, str(out.resolve()))
    assert report.summary() == f"3 repos written under {out.resolve()} (not uploaded: publish.push is false)"
    assert sum(len(r.files) for r in report.repos) == 25 and manifest == read_manifest(out)
    assert sorted(manifest.files) == [f for f in files if f != "manifest.json"]  # checksums of all of them
    assert [(r.repo_id, r.repo_type, r.folder) for r in report.repos] == [
        (MODEL, "model", f"models/{MODEL}"),
        (SFT, "dataset", f"datasets/{SFT}"),
        (DPO, "dataset", f"datasets/{DPO}"),
    ]
    # The stage's val split, published under the Hub's name with every row and column of the stage.
    import pyarrow.parquet as pq

    published = pq.read_table(out / "datasets" / SFT / "data" / "validation-00000-of-00001.parquet")
    stage = pq.read_table(run_dir / "02-teach" / "val.parquet")
    assert published.select(stage.column_names).to_pylist() == stage.to_pylist()


def test_repo_names_derive_from_the_namespace_or_are_given(run_dir: Path, tmp_path: Path) -> None:
    cfg = PublishConfig(namespace="acme", dpo_dataset_repo="other/pairs", private=False)
    manifest = publish.run(cfg, run_dir, tmp_path / "out")
    repos = publish.Report.of(manifest).repos
    assert [r.repo_id for r in repos] == [
        "acme/math-wizard-gemma-3n-dpo",
        "acme/math-wizard-sft",
        "other/pairs",
    ]
    assert [r.private for r in repos] == [False, False, False]
    with pytest.raises(ValueError, match="model_repo"):
        PublishConfig(model_repo="no-namespace")


def test_publishing_is_deterministic(run_dir: Path, tmp_path: Path) -> None:
    """Byte-identical repos from the same run: the condition for "no new commit" on the Hub."""
    publish.run(PublishConfig(), run_dir, tmp_path / "a")
    publish.run(PublishConfig(), run_dir, tmp_path / "b")

    def digests(root: Path) -> dict[str, str]:
        return {f: hashlib.sha256((root / f).read_bytes()).hexdigest() for f in _files(root) if f != "manifest.json"}

    assert digests(tmp_path / "a") == digests(tmp_path / "b")


def test_a_rerun_is_skipped_and_a_new_setting_replaces_the_folder(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = publish.run(PublishConfig(), run_dir, out)

    again = publish.run(PublishConfig(), run_dir, out)
    assert again == first  # the manifest read back, not a new one

    renamed = publish.run(PublishConfig(namespace="acme"), run_dir, out)
    assert renamed.fingerprint != first.fingerprint
    assert sorted(p.name for p in (out / "models").iterdir()) == ["acme"]  # the old namespace's repos are gone


def test_the_fingerprint_covers_the_destination_and_upstream(run_dir: Path, tmp_path: Path) -> None:
    from mathwizard.manifest import fingerprint
    from mathwizard.publish.lineage import RunInfo

    cfg = PublishConfig()
    local = publish.run(cfg, run_dir, tmp_path / "out").fingerprint
    info = RunInfo.read(run_dir)
    assert local == fingerprint("publish", publish.VERSION, cfg, info.upstream(), destination="local")
    assert local != fingerprint("publish", publish.VERSION, cfg, info.upstream(), destination="hub")
    assert (publish.destination(True), publish.destination(False)) == ("hub", "local")
    manifest = run_dir / "04-pairs" / "manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "fingerprint": "new-pairs"}))
    assert publish.run(cfg, run_dir, tmp_path / "out").fingerprint != local  # new pairs: published again


def test_a_deleted_repo_file_is_laid_out_again(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = publish.run(PublishConfig(), run_dir, out)
    card = out / "models" / MODEL / "README.md"
    card.unlink()
    again = publish.run(PublishConfig(), run_dir, out)
    assert card.is_file() and again.files == first.files


def test_a_target_folder_outside_the_stage_folder(run_dir: Path, tmp_path: Path) -> None:
    target, out = tmp_path / "local-hub", tmp_path / "out"
    manifest = publish.run(PublishConfig(target=str(target)), run_dir, out)
    assert _files(out) == ["manifest.json"]
    assert len(_files(target)) == 25
    report = publish.Report.of(manifest)
    assert report.repos[0].folder == str((target / "models" / MODEL).resolve()) and report.root == str(target.resolve())
    assert manifest.files == {}  # repos outside the stage folder are not this folder's files


@pytest.mark.parametrize(("sft", "dpo"), [(0.4, 0.5), (0.4, 0.4)])
def test_the_gate_lets_an_equal_or_better_dpo_model_through(tmp_path: Path, sft: float, dpo: float) -> None:
    run_dir = make_run(tmp_path / "run", accuracies={"sft": sft, "dpo": dpo})
    manifest = publish.run(PublishConfig(require_improvement=True), run_dir, tmp_path / "out")
    assert len(publish.Report.of(manifest).repos) == 3


def test_the_gate_refuses_a_worse_dpo_model_before_writing_anything(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path / "run", accuracies={"sft": 0.4, "dpo": 0.35})
    out = tmp_path / "out"

    with pytest.raises(PublishError) as refused:
        publish.run(PublishConfig(require_improvement=True), run_dir, out)

    message = str(refused.value)
    assert "DPO accuracy 0.350 is below SFT accuracy 0.400" in message and "\n" not in message
    assert not out.exists()
    # Without the gate the same run publishes.
    assert len(publish.Report.of(publish.run(PublishConfig(), run_dir, out)).repos) == 3


def test_the_gate_needs_both_reports_from_the_current_models(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path / "run", evals=("base", "sft"))
    with pytest.raises(PublishError, match=r"needs 06-eval/dpo/report.json; run `mathwizard eval`"):
        publish.run(PublishConfig(require_improvement=True), run_dir, tmp_path / "out")

    run_dir = make_run(tmp_path / "run2")
    manifest = run_dir / "03-sft" / "manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "fingerprint": "retrained"}))
    with pytest.raises(PublishError, match="the sft eval report"):
        publish.run(PublishConfig(require_improvement=True), run_dir, tmp_path / "out")


def test_missing_upstream_stages_are_named(run_dir: Path, tmp_path: Path) -> None:
    (run_dir / "04-pairs" / "manifest.json").unlink()
    with pytest.raises(DataError, match=r"04-pairs has no manifest.json.*`mathwizard pairs`"):
        publish.run(PublishConfig(), run_dir, tmp_path / "out")
    # Publishing only what exists still works.
    manifest = publish.run(PublishConfig(include=["model", "sft_dataset"]), run_dir, tmp_path / "out")
    assert [r.part for r in publish.Report.of(manifest).repos] == ["model", "sft_dataset"]
    assert not (tmp_path / "out" / "datasets" / DPO).exists()

    with pytest.raises(DataError, match=r"run folder .* does not exist"):
        publish.run(PublishConfig(), tmp_path / "nowhere", tmp_path / "out")


@pytest.mark.parametrize(
    ("stage", "damaged"),
    [
        ("teach", "02-teach/val.parquet"),
        ("dpo", "05-dpo/adapter/adapter_model.safetensors"),
        ("pairs", "04-pairs/train.parquet"),
    ],
)
def test_a_damaged_upstream_is_one_line_and_nothing_is_written(
    run_dir: Path, tmp_path: Path, stage: str, damaged: str
) -> None:
    (run_dir / damaged).unlink()
    with pytest.raises(DataError) as info:
        publish.run(PublishConfig(), run_dir, tmp_path / "out")
    folder, name = damaged.split("/", 1)
    assert str(info.value) == (
        f"{run_dir / folder} is damaged ({name} is missing); run `mathwizard {stage}` again to redo it"
    )
    assert not (tmp_path / "out").exists()  # an incomplete dataset or a model without weights is never published


def test_unreadable_eval_report_is_a_data_error(run_dir: Path, tmp_path: Path) -> None:
    (run_dir / "06-eval" / "sft" / "report.json").write_text('{"n": 3}')
    with pytest.raises(DataError) as info:
        publish.run(PublishConfig(), run_dir, tmp_path / "out")
    path = run_dir / "06-eval" / "sft" / "report.json"
    assert str(info.value) == f"{path} is missing or unreadable (ValidationError); run `mathwizard eval`"
    assert not (tmp_path / "out").exists()


def test_push_merged_needs_merged_weights(run_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"publish\.push_merged needs merged weights .* dpo\.save_merged=true"):
        publish.run(PublishConfig(push_merged=True), run_dir, tmp_path / "out")

    merged_run = make_run(tmp_path / "merged-run", merged=True)
    publish.run(PublishConfig(push_merged=True), merged_run, tmp_path / "out2")
    repo = tmp_path / "out2" / "models" / MODEL
    assert _files(repo / "merged") == ["config.json", "model.safetensors"]
    assert 'subfolder="merged"' in (repo / "README.md").read_text()


def test_a_token_in_the_environment_is_not_written_anywhere(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)  # HF_HUB_OFFLINE=1 (tests/conftest.py): published locally
    manifest = publish.run(PublishConfig(), run_dir, tmp_path / "out")
    assert publish.Report.of(manifest).destination == "local"
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and TOKEN.encode() in p.read_bytes()]
    assert read_manifest(tmp_path / "out") is not None
