"""The pipeline with its artifact root on s3:// (moto's S3 server on 127.0.0.1): stages hand work over through it.

The default test runs prepare → teach in this process with Prefect results on S3 too; a second "machine" (another
scratch folder) then finds both stages done without running or uploading anything. Another shows the teacher's
reply cache travelling through S3: a run cut off by an API outage on one machine is finished on another, paying
only for the missing replies. The slow test runs the whole smoke pipeline deployment with the GPU stages on the cuda
worker, which has its own scratch folder and sees the artifacts only through S3.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from mathwizard import storage
from mathwizard.config import load_settings
from mathwizard.errors import TransientError

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "deployments" / "recipes" / "smoke.yaml"


def remote_files(url: str) -> set[str]:
    fs, root = storage.filesystem(url)
    fs.invalidate_cache()
    return {p[len(root) + 1 :] for p in fs.find(root)}


def test_prepare_and_teach_hand_over_through_s3(prefect_harness, bucket: str, tmp_path: Path, monkeypatch) -> None:
    from flows.pipeline import remote_result_storage, teacher_only

    home = f"{bucket}/mw"
    settings = load_settings(SMOKE, home=home, orchestration={"scratch": str(tmp_path / "machine-a")})
    block = remote_result_storage(settings)
    first = teacher_only.with_options(result_storage=block)(settings=settings)

    run = f"{home}/runs/smoke"
    files = remote_files(run)
    assert {
        "01-prepare/manifest.json",
        "01-prepare/train-00000-of-00001.parquet",
        "01-prepare/val-00000-of-00001.parquet",
        "01-prepare/test-00000-of-00001.parquet",
        "02-teach/manifest.json",
        "02-teach/train.parquet",
        "02-teach/val.parquet",
        "02-teach/test.parquet",
    } <= files
    assert storage.remote_manifest(f"{run}/02-teach").upstream["prepare"] == first["prepare"]["fingerprint"]
    assert first["teach"]["counts"]["written"] == 60  # 51 train + 4 val + 5 test
    # Prefect's task results (the manifests) went to the artifact root too, where every worker can read them.
    assert any(name.startswith("prefect-results/") for name in remote_files(home))
    assert not (tmp_path / "mathwizard-home").exists()

    # Machine B: nothing local. Both stages are found finished from their manifests alone: no stage work, no upload.
    sent: list[int] = []
    real_push = storage.push

    def counting_push(*args, **kwargs) -> int:
        sent.append(real_push(*args, **kwargs))
        return sent[-1]

    monkeypatch.setattr(storage, "push", counting_push)
    other = settings.model_copy(
        update={"orchestration": settings.orchestration.model_copy(update={"scratch": str(tmp_path / "machine-b")})}
    )
    second = teacher_only(settings=other)
    assert {k: v["fingerprint"] for k, v in second.items()} == {k: v["fingerprint"] for k, v in first.items()}
    assert sum(sent) == 0  # (the shared cache is compared after teach, and found unchanged)
    mirrored = sorted(p.name for p in (tmp_path / "machine-b" / "home").glob("*/runs/smoke/02-teach/*"))
    assert mirrored == [storage.MIRROR_MARK, "manifest.json"]


@pytest.mark.slow
def test_smoke_pipeline_deployment_on_s3(prefect_stack, bucket: str) -> None:
    home = f"{bucket}/mw"
    overrides = {
        "orchestration": {
            "gpu_deployments": {
                "sft": "mathwizard-sft/cuda",
                "pairs": "mathwizard-pairs/cuda",
                "dpo": "mathwizard-dpo/cuda",
                "eval": "mathwizard-eval/cuda",
            },
            "poll_seconds": 2,
        }
    }
    run_id = prefect_stack.run(
        "math-wizard/smoke",
        {"params": {"recipe": "deployments/recipes/smoke.yaml", "home": home, "overrides": overrides}},
    )
    run = prefect_stack.wait(run_id, timeout=1500)
    assert run["state_type"] == "COMPLETED", prefect_stack.logs(run_id)[-4000:] + prefect_stack.log_tail()

    run_dir = f"{home}/runs/smoke"
    assert storage.find_stage_folders(run_dir) == [
        "01-prepare",
        "02-teach",
        "03-sft",
        "04-pairs",
        "05-dpo",
        "06-eval/base",
        "06-eval/dpo",
        "06-eval/sft",
        "07-publish",
    ]
    files = remote_files(run_dir)
    assert {"03-sft/adapter/adapter_config.json", "05-dpo/adapter/adapter_config.json"} <= files
    assert {"06-eval/dpo/report.json", "04-pairs/train.parquet"} <= files
    # SFT ran on the cuda worker from teach's output, which only the cpu worker had written: the hand-over was S3.
    sft = storage.remote_manifest(f"{run_dir}/03-sft")
    assert sft.upstream["teach"] == storage.remote_manifest(f"{run_dir}/02-teach").fingerprint
    cuda_scratch = prefect_stack.root / "scratch-cuda"
    cpu_scratch = prefect_stack.root / "scratch-cpu"
    assert list(cuda_scratch.glob("home/*/runs/smoke/02-teach/train.parquet"))  # pulled by the GPU side
    # Publish (CPU side) pulled the SFT adapter, but not its checkpoints: resume state stays with its stage.
    assert list(cpu_scratch.glob("home/*/runs/smoke/03-sft/adapter/adapter_config.json"))
    assert any(name.startswith("03-sft/checkpoints/") for name in files)
    assert not list(cpu_scratch.glob("home/*/runs/smoke/03-sft/checkpoints"))


def test_teacher_cache_on_s3_lets_another_machine_resume(bucket: str, tmp_path: Path, monkeypatch) -> None:
    """The API fails mid-way on machine A; machine B (empty disk) finishes, asking only what A did not get."""
    from mathwizard.remote import run_on_storage
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
        assert manifest["counts"]["written"] == 60
        assert server.requests == 60 - 25  # the 25 replies A got came to B through the cache on S3
