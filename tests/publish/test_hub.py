"""The real upload path against a recording Hub on 127.0.0.1: nothing sent unless asked, what is sent, idempotence,
errors, the token."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from mathwizard.config import PublishConfig
from mathwizard.errors import ConfigError, PublishError, TransientError, is_transient
from mathwizard.manifest import read_manifest
from mathwizard.publish.hub import resolve_token
from mathwizard.stages import publish
from tests.publish.fakehub import TOKEN, FakeHub

MODEL, SFT, DPO = "acme/math-wizard-gemma-3n-dpo", "acme/math-wizard-sft", "acme/math-wizard-dpo"
MODEL_FILES = {
    "README.md",
    "adapter_config.json",
    "adapter_model.safetensors",
    "mathwizard_adapter.json",
    "tokenizer_config.json",
    "eval/base.json",
    "eval/sft.json",
    "eval/dpo.json",
    "plots/sft_loss.png",
    *(f"plots/dpo_{n}.png" for n in ("loss", "rewards_accuracies", "rewards_chosen", "rewards_rejected")),
    "plots/dpo_rewards_margins.png",
    *(f"sft-adapter/{n}" for n in ("adapter_config.json", "adapter_model.safetensors", "mathwizard_adapter.json")),
    "sft-adapter/tokenizer_config.json",
}  # 5 adapter files + 3 eval reports + 6 plots + 4 SFT adapter files = 18
SFT_FILES = {"README.md", *(f"data/{s}-00000-of-00001.parquet" for s in ("train", "validation", "test"))}
DPO_FILES = {"README.md", *(f"data/{s}-00000-of-00001.parquet" for s in ("train", "validation"))}


def _cfg(hub: FakeHub, **overrides) -> PublishConfig:
    return PublishConfig(namespace="acme", endpoint=hub.url, **{"push": True, **overrides})


def _hf_login(token: str) -> None:
    """What `hf auth login` leaves behind: the token in HF_TOKEN_PATH (a temporary path, see no_hub_login)."""
    import huggingface_hub.constants

    login = Path(huggingface_hub.constants.HF_TOKEN_PATH)
    login.parent.mkdir(parents=True, exist_ok=True)
    login.write_text(token)


def test_a_cached_token_without_push_sends_nothing(
    run_dir: Path, tmp_path: Path, fake_hub: FakeHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default: a Hub login and HF_TOKEN at hand, the Hub reachable, and not one request goes out."""
    _hf_login(TOKEN)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert resolve_token() == TOKEN  # a token is there to be found

    manifest = publish.run(_cfg(fake_hub, push=False), run_dir, tmp_path / "out")

    assert fake_hub.requests == [] and fake_hub.repos == {}
    report = publish.Report.of(manifest)
    assert (report.destination, report.endpoint) == ("local", None)
    assert report.summary().endswith("(not uploaded: publish.push is false)")
    assert [(r.private, r.url, r.commit) for r in report.repos] == [(True, None, None)] * 3  # private by default
    assert (tmp_path / "out" / "models" / MODEL / "README.md").is_file()


def test_push_without_a_token_is_one_line_before_anything_is_written(
    run_dir: Path, tmp_path: Path, fake_hub: FakeHub
) -> None:
    with pytest.raises(ConfigError) as refused:
        publish.run(_cfg(fake_hub), run_dir, tmp_path / "out", token_block="hf-token")
    assert str(refused.value) == (
        "publish.push is true but there is no Hub token: set HF_TOKEN or run `hf auth login`, or save one in the"
        " Prefect Secret block 'hf-token'; or publish without --push to write the repos locally"
    )
    assert fake_hub.requests == [] and not (tmp_path / "out").exists()


def _committed_paths(commit) -> dict[str, str]:
    """path -> operation key of one recorded NDJSON commit (header line excluded)."""
    lines = commit.ndjson()
    assert lines[0]["key"] == "header"
    return {line["value"]["path"]: line["key"] for line in lines[1:]}


def _repo_of(commit) -> str:
    return commit.path.split("/commit/")[0].split("/", 3)[3]


def test_upload_creates_repos_and_commits_every_file_with_the_token_header(
    run_dir: Path, tmp_path: Path, fake_hub: FakeHub, monkeypatch: pytest.MonkeyPatch, caplog, capsys
) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    caplog.set_level(logging.DEBUG)
    out = tmp_path / "07-publish"

    manifest = publish.run(_cfg(fake_hub, private=True), run_dir, out)

    creates = [r.json() for r in fake_hub.calls("POST", r"^/api/repos/create$")]
    assert creates == [
        {"name": "math-wizard-gemma-3n-dpo", "organization": "acme", "visibility": "private", "type": "model"},
        {"name": "math-wizard-sft", "organization": "acme", "visibility": "private", "type": "dataset"},
        {"name": "math-wizard-dpo", "organization": "acme", "visibility": "private", "type": "dataset"},
    ]
    assert all(fake_hub.repo(t, r).private for t, r in [("model", MODEL), ("dataset", SFT), ("dataset", DPO)])
    # The token travels as a header on every request, and nowhere else.
    assert fake_hub.requests and all(r.headers["authorization"] == f"Bearer {TOKEN}" for r in fake_hub.requests)
    assert not any(TOKEN.encode() in r.body for r in fake_hub.requests)

    commits = fake_hub.commits()
    assert [_repo_of(c) for c in commits] == [MODEL, SFT, DPO]  # one commit per repo
    assert set(_committed_paths(commits[0])) == MODEL_FILES and len(MODEL_FILES) == 18
    assert set(_committed_paths(commits[1])) == SFT_FILES
    assert set(_committed_paths(commits[2])) == DPO_FILES
    assert commits[0].path == "/api/models/acme/math-wizard-gemma-3n-dpo/commit/main"
    assert commits[1].path == "/api/datasets/acme/math-wizard-sft/commit/main"

    # What the Hub now holds is exactly what was laid out locally, cards included.
    model_dir = out / "models" / MODEL
    remote = fake_hub.repo("model", MODEL).files
    assert remote["README.md"] == (model_dir / "README.md").read_bytes()
    assert "| DPO | 10 | 50.0% | 100.0% |" in remote["README.md"].decode()
    assert set(remote) == MODEL_FILES | {".gitattributes"}
    sft_train = "data/train-00000-of-00001.parquet"
    assert fake_hub.repo("dataset", SFT).files[sft_train] == (out / "datasets" / SFT / sft_train).read_bytes()

    report = publish.Report.of(manifest)
    repos = report.repos
    assert report.destination == "hub" and report.endpoint == fake_hub.url
    assert report.summary() == f"3 repos on {fake_hub.url}: " + ", ".join(r.url for r in repos)
    assert [r.url for r in repos] == [
        f"{fake_hub.url}/{MODEL}",
        f"{fake_hub.url}/datasets/{SFT}",
        f"{fake_hub.url}/datasets/{DPO}",
    ]
    assert all(r.commit for r in repos) and [r.deleted for r in repos] == [[], [], []]
    assert sum(len(r.uploaded) for r in repos) == 18 + 4 + 3  # model + SFT dataset + DPO dataset files

    # Never written or logged: not in any file under tmp_path (run, stage folder, manifest), logs or output.
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(written) > 60
    assert not [p for p in written if TOKEN.encode() in p.read_bytes()]
    captured = capsys.readouterr()
    assert TOKEN not in caplog.text and TOKEN not in captured.out + captured.err
    assert "committed" in caplog.text  # the logs were captured at all


def test_rerun_with_nothing_new_sends_no_commit(
    run_dir: Path, tmp_path: Path, fake_hub: FakeHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    cfg = _cfg(fake_hub)
    first = publish.run(cfg, run_dir, tmp_path / "a")
    sent = len(fake_hub.requests)

    # Same stage folder: the manifest matches, so nothing is even asked.
    again = publish.run(cfg, run_dir, tmp_path / "a")
    assert len(fake_hub.requests) == sent and again.created_at == first.created_at

    # A fresh stage folder (e.g. another machine): huggingface_hub asks the Hub about each file (preupload), finds
    # every one unchanged and sends no commit.
    fresh = publish.run(cfg, run_dir, tmp_path / "b")
    new = fake_hub.requests[sent:]
    assert len([r for r in new if "/preupload/" in r.path]) == 3
    assert not [r for r in new if "/commit/" in r.path]
    fresh_repos = publish.Report.of(fresh).repos
    assert [r.commit for r in fresh_repos] == [None, None, None]
    assert [r.uploaded for r in fresh_repos] == [[], [], []]
    assert [len(fake_hub.repo(t, r).commits) for t, r in [("model", MODEL), ("dataset", SFT), ("dataset", DPO)]] == [
        2,
        2,
        2,
    ]  # the Hub's initial commit + ours, each


def test_a_changed_report_commits_only_the_files_it_changes(
    run_dir: Path, tmp_path: Path, fake_hub: FakeHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    cfg = _cfg(fake_hub)
    publish.run(cfg, run_dir, tmp_path / "a")
    report = run_dir / "06-eval" / "dpo" / "report.json"
    data = json.loads(report.read_text())
    report.write_text(json.dumps({**data, "accuracy": 0.6}))
    fake_hub.repo("model", MODEL).files["old-notes.txt"] = b"from an earlier run"
    before = len(fake_hub.commits())

    manifest = publish.run(cfg, run_dir, tmp_path / "b")

    commits = fake_hub.commits()[before:]
    assert len(commits) == 1 and _repo_of(commits[0]) == MODEL
    expected = {"README.md": "file", "eval/dpo.json": "file", "old-notes.txt": "deletedFile"}
    assert _committed_paths(commits[0]) == expected
    assert "| DPO | 10 | 60.0% |" in fake_hub.repo("model", MODEL).files["README.md"].decode()
    model = publish.Report.of(manifest).repos[0]
    assert model.uploaded == ["README.md", "eval/dpo.json"] and model.deleted == ["old-notes.txt"]


def test_stale_remote_files_are_kept_when_delete_stale_is_off(
    run_dir: Path, tmp_path: Path, fake_hub: FakeHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    publish.run(_cfg(fake_hub), run_dir, tmp_path / "a")
    fake_hub.repo("model", MODEL).files["notes.txt"] = b"added on the Hub by hand"
    before = len(fake_hub.commits())

    publish.run(_cfg(fake_hub, delete_stale=False), run_dir, tmp_path / "b")

    assert len(fake_hub.commits()) == before
    assert "notes.txt" in fake_hub.repo("model", MODEL).files


def test_hub_5xx_is_transient_and_the_retry_only_sends_what_is_missing(
    run_dir: Path, tmp_path: Path, fake_hub: FakeHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    out = tmp_path / "07-publish"
    fake_hub.fail_next(r"/api/datasets/acme/math-wizard-dpo/commit/", 503)

    with pytest.raises(TransientError, match=r"failed on dataset repo acme/math-wizard-dpo \(503\)") as failed:
        publish.run(_cfg(fake_hub), run_dir, out)
    assert is_transient(failed.value)
    assert read_manifest(out) is None  # not marked done
    assert [_repo_of(c) for c in fake_hub.commits()] == [MODEL, SFT, DPO]  # the last one was refused

    manifest = publish.run(_cfg(fake_hub), run_dir, out)  # what Prefect's retry does

    assert [_repo_of(c) for c in fake_hub.commits()] == [MODEL, SFT, DPO, DPO]
    assert [r.commit is not None for r in publish.Report.of(manifest).repos] == [False, False, True]


def test_a_refused_token_is_a_permanent_one_line_error(
    run_dir: Path, tmp_path: Path, fake_hub: FakeHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    wrong = "hf_NotTheRightToken000000000000000000"
    monkeypatch.setenv("HF_TOKEN", wrong)

    with pytest.raises(PublishError) as refused:
        publish.run(_cfg(fake_hub), run_dir, tmp_path / "out")

    message = str(refused.value)
    assert "refused model repo acme/math-wizard-gemma-3n-dpo (401)" in message and "write access" in message
    assert "\n" not in message and wrong not in message and not is_transient(refused.value)
    assert fake_hub.commits() == []


def test_an_unreachable_hub_is_transient(run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with FakeHub() as hub:
        closed = hub.url  # the port is free again once the server is gone
    cfg = PublishConfig(namespace="acme", endpoint=closed, push=True)

    with pytest.raises(TransientError, match="cannot reach the Hub"):
        publish.run(cfg, run_dir, tmp_path / "out")


def test_the_hf_login_token_is_used_with_push(run_dir: Path, tmp_path: Path, fake_hub: FakeHub) -> None:
    _hf_login(TOKEN)

    manifest = publish.run(_cfg(fake_hub), run_dir, tmp_path / "out")

    assert publish.Report.of(manifest).destination == "hub" and len(fake_hub.commits()) == 3


def test_token_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_token() is None  # no env, no .env, no login (conftest)
    _hf_login("hf_login")
    assert resolve_token() == "hf_login"
    monkeypatch.setenv("HF_TOKEN", "hf_env")
    assert resolve_token() == "hf_env"
    monkeypatch.setenv("MATHWIZARD_HF_TOKEN", "hf_mathwizard")
    assert resolve_token() == "hf_mathwizard"
    assert resolve_token("hf_block") == "hf_block"  # a Prefect Secret block, passed by the task


def test_a_target_folder_is_where_the_repos_are_laid_out_and_pushed_from(
    run_dir: Path, tmp_path: Path, fake_hub: FakeHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    target = tmp_path / "hub-folder"

    local = publish.run(_cfg(fake_hub, target=str(target), push=False), run_dir, tmp_path / "out")
    assert fake_hub.requests == [] and publish.Report.of(local).destination == "local"
    assert (target / "models" / MODEL / "README.md").is_file()
    assert (target / "datasets" / DPO / "data" / "validation-00000-of-00001.parquet").is_file()

    pushed = publish.run(_cfg(fake_hub, target=str(target)), run_dir, tmp_path / "out")
    assert publish.Report.of(pushed).destination == "hub" and len(fake_hub.commits()) == 3


def test_push_with_offline_mode_is_one_line_and_sends_nothing(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)  # HF_HUB_OFFLINE=1 comes from tests/conftest.py
    cfg = PublishConfig(namespace="acme", endpoint="http://127.0.0.1:9", push=True)

    with pytest.raises(ConfigError, match=r"^publish.push is true but HF_HUB_OFFLINE is set: unset it to upload"):
        publish.run(cfg, run_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # Without push the same run publishes locally.
    report = publish.Report.of(publish.run(PublishConfig(namespace="acme"), run_dir, tmp_path / "out"))
    assert (report.destination, report.endpoint) == ("local", None)
    assert [(r.url, r.commit, r.uploaded) for r in report.repos] == [(None, None, [])] * 3
