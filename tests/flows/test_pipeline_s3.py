"""The pipeline with its artifact root on s3:// (moto's S3 server on 127.0.0.1): stages hand work over through it.

The default test runs prepare → teach in this process; a second "machine" (another scratch folder) then finds
both stages done from their manifests on S3, without running or uploading anything. The slow test runs the whole
smoke pipeline deployment with the GPU stages on the cuda worker, which has its own scratch folder and sees the
artifacts only through S3. (The teacher cache travelling through S3 is tested in tests/test_remote.py.)
"""

from __future__ import annotations

from pathlib import Path

import pytest

from mathwizard import storage

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "deployments" / "recipes" / "smoke.yaml"


def remote_files(url: str) -> set[str]:
    fs, root = storage.filesystem(url)
    fs.invalidate_cache()
    return {p[len(root) + 1 :] for p in fs.find(root)}


def test_prepare_and_teach_hand_over_through_s3(prefect_harness, bucket: str, tmp_path: Path, monkeypatch) -> None:
    from flows.pipeline import PipelineParams, data_only
    from mathwizard.stages import teach

    home = f"{bucket}/mw"
    first = data_only(
        PipelineParams(recipe="smoke", home=home, advanced={"orchestration": {"scratch": str(tmp_path / "machine-a")}})
    )

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
    taught = storage.remote_manifest(f"{run}/02-teach")
    assert taught.upstream["prepare"] == storage.remote_manifest(f"{run}/01-prepare").fingerprint
    assert first["prepare"]["fingerprint"] == storage.remote_manifest(f"{run}/01-prepare").fingerprint[:12]
    assert teach.Report.of(taught).written == 60  # 51 train + 4 val + 5 test
    assert first["teach"]["summary"] == teach.Report.of(taught).summary()
    # Only the run's stage folders on the artifact root (the smoke recipe's rule teacher keeps no reply cache): the
    # manifests are the hand-over, no Prefect result storage is needed.
    assert {name.split("/")[0] for name in remote_files(home)} == {"runs"}
    assert not (tmp_path / "mathwizard-home").exists()

    # Machine B: nothing local. Both stages are found finished from their manifests alone: no stage work, no upload.
    sent: list[int] = []
    real_push = storage.push

    def counting_push(*args, **kwargs) -> int:
        sent.append(real_push(*args, **kwargs))
        return sent[-1]

    monkeypatch.setattr(storage, "push", counting_push)
    other = PipelineParams(
        recipe="smoke", home=home, advanced={"orchestration": {"scratch": str(tmp_path / "machine-b")}}
    )
    second = data_only(other)
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
                "sft": "math-wizard-gpu-sft/sft-on-cuda",
                "pairs": "math-wizard-gpu-pairs/pairs-on-cuda",
                "dpo": "math-wizard-gpu-dpo/dpo-on-cuda",
                "eval": "math-wizard-gpu-eval/eval-on-cuda",
            },
            "poll_seconds": 2,
        }
    }
    run_id = prefect_stack.run(
        "math-wizard/smoke",
        {"params": {"recipe": "smoke", "home": home, "advanced": overrides}},
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
