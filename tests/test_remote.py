"""remote.run_on_storage: stages on local folders hand work over through S3 (moto), skip, resume and share caches;
the teach stage's reply cache lets another machine finish a run cut off by an outage."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from mathwizard import storage
from mathwizard.config import Settings, load_settings
from mathwizard.errors import TransientError
from mathwizard.manifest import fingerprint, read_manifest, reusable, stage_output
from mathwizard.remote import run_on_storage

SMOKE = Path(__file__).resolve().parents[1] / "deployments" / "recipes" / "smoke.yaml"


def remote_files(url: str) -> set[str]:
    fs, root = storage.filesystem(url)
    fs.invalidate_cache()
    return {p[len(root) + 1 :] for p in fs.find(root)}


SMOKE = Path(__file__).resolve().parents[1] / "deployments" / "recipes" / "smoke.yaml"


class FakeStage:
    """A stage shaped like the real ones: fingerprint from config + upstream manifest, skip when done."""

    def __init__(self, name: str, fail_after: int | None = None) -> None:
        self.name, self.fail_after, self.calls, self.work = name, fail_after, [], 0

    def __call__(self, settings: Settings, out: str, data: str | None = None, **params: Any) -> dict[str, Any]:
        self.calls.append({"home": settings.home, "out": out, "data": data, **params})
        upstream = {}
        if data is not None:
            up = read_manifest(Path(data))
            assert up is not None, f"input {data} is not a finished local folder"
            upstream = {up.stage: up.fingerprint}
        fp = fingerprint(self.name, 1, {"run": settings.run_name}, upstream)
        done = reusable(Path(out), fp)
        if done is not None:
            return done.model_dump(mode="json")
        # Resume state: one chunk file per unit of work, kept across failed attempts.
        chunks = Path(out) / "chunks"
        chunks.mkdir(parents=True, exist_ok=True)
        cache = Path(settings.cache_dir) / "teacher"
        cache.mkdir(parents=True, exist_ok=True)
        with stage_output(Path(out), stage=self.name, version=1, fingerprint=fp, upstream=upstream) as record:
            for i in range(3):
                if (chunks / f"{i}.json").exists():
                    continue
                if self.fail_after is not None and self.work >= self.fail_after:
                    raise ConnectionError("teacher API unavailable (503)")
                self.work += 1
                (chunks / f"{i}.json").write_text(json.dumps(i))
                (cache / f"{i}.json").write_text(json.dumps(i))
            (Path(out) / "rows.jsonl").write_text("".join(f"{i}\n" for i in range(3)))
            record.add_file("rows.jsonl", rows=3)
        return record.manifest.model_dump(mode="json")


@pytest.fixture
def s3_settings(bucket: str, tmp_path: Path) -> Settings:
    return load_settings(home=f"{bucket}/mw", run_name="r1", orchestration={"scratch": str(tmp_path / "scratch")})


def test_local_run_calls_the_stage_directly(tmp_path: Path) -> None:
    settings = load_settings(home=str(tmp_path / "home"))
    stage = FakeStage("prepare")
    out = settings.stage_dir("prepare")
    manifest = run_on_storage("prepare", stage, settings, {}, out)
    assert stage.calls == [{"home": settings.home, "out": out, "data": None}]
    assert read_manifest(Path(out)).fingerprint == manifest["fingerprint"]


def test_two_stages_hand_over_through_s3(s3_settings: Settings, tmp_path: Path) -> None:
    prepare, teach = FakeStage("prepare"), FakeStage("teach")
    prep_url, teach_url = s3_settings.stage_dir("prepare"), s3_settings.stage_dir("teach")
    first = run_on_storage("prepare", prepare, s3_settings, {}, prep_url)
    assert storage.remote_manifest(prep_url).fingerprint == first["fingerprint"]

    second = run_on_storage("teach", teach, s3_settings, {"data": prep_url}, teach_url, label="x")
    # The stage saw local paths only, laid out like the remote root, and a local artifact root (for its cache).
    call = teach.calls[0]
    assert "://" not in call["out"] and "://" not in call["data"] and "://" not in call["home"]
    assert call["out"] == f"{call['home']}/runs/r1/02-teach" and call["data"] == f"{call['home']}/runs/r1/01-prepare"
    assert call["label"] == "x"
    assert second["upstream"] == {"prepare": first["fingerprint"]}
    assert storage.remote_manifest(teach_url).fingerprint == second["fingerprint"]
    fs, root = storage.filesystem(teach_url)
    assert fs.cat_file(f"{root}/rows.jsonl") == b"0\n1\n2\n"
    # The teacher cache went to the shared root: 3 items -> 3 files.
    cache_fs, cache_root = storage.filesystem(f"{s3_settings.cache_dir}/teacher")
    assert len(cache_fs.find(cache_root)) == 3


def test_finished_remote_stage_is_skipped_without_transfers(s3_settings: Settings, tmp_path: Path, monkeypatch) -> None:
    prepare = FakeStage("prepare")
    url = s3_settings.stage_dir("prepare")
    first = run_on_storage("prepare", prepare, s3_settings, {}, url)
    assert prepare.work == 3

    # Another machine: an empty scratch. It must not download or upload anything but the manifest.
    other = s3_settings.model_copy(
        update={"orchestration": s3_settings.orchestration.model_copy(update={"scratch": str(tmp_path / "other")})}
    )
    pushes: list[str] = []
    monkeypatch.setattr(storage, "push", lambda *a, **k: pushes.append(str(a[1])))
    again = FakeStage("prepare")
    result = run_on_storage("prepare", again, other, {}, url)
    assert result["fingerprint"] == first["fingerprint"]
    assert again.work == 0 and pushes == []
    homes = list((tmp_path / "other" / "home").iterdir())
    assert len(homes) == 1  # one remote root -> one local mirror
    work = homes[0] / "runs" / "r1" / "01-prepare"
    assert sorted(p.name for p in work.iterdir()) == [storage.MIRROR_MARK, "manifest.json"]

    # A later stage that needs the folder's files downloads them in spite of the manifest-only mirror.
    seen: dict[str, Any] = {}

    def consumer(settings: Settings, out: str, data: str) -> dict[str, Any]:
        seen["files"] = sorted(p.name for p in Path(data).iterdir())
        return {"fingerprint": "c"}

    run_on_storage("teach", consumer, other, {"data": url}, str(tmp_path / "c"))
    assert seen["files"] == ["manifest.json", "rows.jsonl"]


def test_failed_attempt_resumes_on_another_machine(s3_settings: Settings, tmp_path: Path) -> None:
    prepare = FakeStage("prepare")
    prep_url, teach_url = s3_settings.stage_dir("prepare"), s3_settings.stage_dir("teach")
    run_on_storage("prepare", prepare, s3_settings, {}, prep_url)

    flaky = FakeStage("teach", fail_after=2)
    with pytest.raises(ConnectionError):
        run_on_storage("teach", flaky, s3_settings, {"data": prep_url}, teach_url)
    assert flaky.work == 2
    assert storage.remote_manifest(teach_url) is None  # not finished ...
    fs, root = storage.filesystem(teach_url)
    assert sorted(Path(p).name for p in fs.find(f"{root}/chunks")) == ["0.json", "1.json"]  # ... but shared

    other = s3_settings.model_copy(
        update={"orchestration": s3_settings.orchestration.model_copy(update={"scratch": str(tmp_path / "other")})}
    )
    healthy = FakeStage("teach")
    result = run_on_storage("teach", healthy, other, {"data": prep_url}, teach_url)
    assert healthy.work == 1  # 3 chunks - 2 done elsewhere
    assert storage.remote_manifest(teach_url).fingerprint == result["fingerprint"]
    cache_fs, cache_root = storage.filesystem(f"{s3_settings.cache_dir}/teacher")
    assert len(cache_fs.find(cache_root)) == 3


def test_run_folder_input_pulls_every_finished_stage(s3_settings: Settings, tmp_path: Path) -> None:
    run_on_storage("prepare", FakeStage("prepare"), s3_settings, {}, s3_settings.stage_dir("prepare"))
    run_on_storage("eval", FakeStage("eval"), s3_settings, {}, f"{s3_settings.stage_dir('eval')}/sft")
    seen: dict[str, Any] = {}

    def publish(settings: Settings, out: str, run_dir: str) -> dict[str, Any]:
        seen["run_dir"] = run_dir
        return {"fingerprint": "p"}

    run_on_storage("publish", publish, s3_settings, {"run_dir": s3_settings.run_dir}, str(tmp_path / "pub"))
    local = Path(seen["run_dir"])
    assert sorted(p.parent.relative_to(local).as_posix() for p in local.glob("**/manifest.json")) == [
        "01-prepare",
        "06-eval/sft",
    ]


def test_teacher_cache_on_s3_lets_another_machine_resume(bucket: str, tmp_path: Path, monkeypatch) -> None:
    """The API fails mid-way on machine A; machine B (empty disk) finishes, asking only what A did not get."""
    from mathwizard.stages import prepare, teach
    from mathwizard.testing.openai_server import OpenAITestServer

    monkeypatch.setenv("MATHWIZARD_TEACHER_API_KEY", "sk-test-dummy")  # only ever sent to the local test server

    def prepare_stage(settings, out: str) -> dict:
        return prepare.run(settings.prepare, Path(out)).model_dump(mode="json")

    def teach_stage(settings, out: str, data: str) -> dict:  # the library alone: no Prefect task retries to wait for
        return teach.run(settings.teacher, Path(data), Path(out), Path(settings.cache_dir)).model_dump(mode="json")

    with OpenAITestServer() as server:
        teacher = {"kind": "openai", "base_url": server.base_url, "concurrency": 1, "request_retries": 0}
        a = load_settings(SMOKE, home=f"{bucket}/mw", teacher=teacher, orchestration={"scratch": str(tmp_path / "a")})
        b = a.model_copy(update={"orchestration": a.orchestration.model_copy(update={"scratch": str(tmp_path / "b")})})
        prepared, taught = a.stage_dir("prepare"), a.stage_dir("teach")
        run_on_storage("prepare", prepare_stage, a, {}, prepared)

        server.fail_after(25, "503")  # 25 replies, then the API is down
        with pytest.raises(TransientError, match="re-run to resume"):
            run_on_storage("teach", teach_stage, a, {"data": prepared}, taught)
        assert server.outcomes["ok"] == 25
        assert any(name.startswith("teacher") for name in remote_files(f"{bucket}/mw/cache"))

        server.clear()
        server.reset_counts()
        manifest = run_on_storage("teach", teach_stage, b, {"data": prepared}, taught)
        assert teach.Report.of(manifest).written == 60
        assert server.requests == 60 - 25  # the 25 replies A got came to B through the cache on S3
