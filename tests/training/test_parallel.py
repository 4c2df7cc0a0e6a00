"""SFT and DPO on two processes (gloo on the CPU, `model.gpus: 2`): the same losses as one process at the same
effective batch, and a checkpoint written by one process resumed by two."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from mathwizard.config import DPOConfig, LoRAConfig, ModelConfig, SFTConfig
from mathwizard.errors import ConfigError
from mathwizard.manifest import read_manifest
from tests.training.builders import Interrupted, interrupt_at, pairs_folder, teach_folder

# LoRA dropout off: with it, each rank draws its own masks and the runs differ by more than float reductions.
NO_DROPOUT = LoRAConfig(dropout=0.0)


def _losses(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r.get("loss") is not None}


def test_sft_on_two_processes_gives_the_losses_of_one_at_the_same_effective_batch(tmp_path: Path) -> None:
    from mathwizard.stages import sft

    teach = teach_folder(tmp_path / "02-teach", n_train=8, n_val=2)
    # Effective batch 4 either way: 1 process x 2 rows x 2 accumulation, or 2 processes x 2 rows x 1.
    cfg = SFTConfig(
        max_steps=2,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        save_steps=50,
        max_length=512,
        warmup_steps=0,
        learning_rate=1e-3,
        eval_steps=None,
        lora=NO_DROPOUT,
    )
    seen: list[tuple[int, int]] = []
    # The launch waits on its ranks (own processes, ~20 s of imports and loading); the one-process run goes meanwhile.
    with ThreadPoolExecutor(max_workers=1) as pool:
        launched = pool.submit(
            sft.run, cfg, ModelConfig(gpus=2), teach, tmp_path / "two", progress=lambda d, t, **m: seen.append((d, t))
        )
        one = sft.run(cfg, ModelConfig(gpus=1), teach, tmp_path / "one")
        two = launched.result()

    single, parallel = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert sorted(single) == sorted(parallel) == [1, 2]
    # Step 1 is equal to the last digit (LoRA's B starts at zero); later steps differ by float reduction order only.
    for step in single:
        assert parallel[step] == pytest.approx(single[step], abs=1e-4), (step, single, parallel)
    report_one, report_two = sft.Report.of(one), sft.Report.of(two)
    assert (report_one.processes, report_two.processes) == (1, 2)
    assert (report_two.steps, report_two.train_rows, report_two.device) == (2, 8, "cpu")
    assert report_two.eval_loss == pytest.approx(report_one.eval_loss, abs=1e-4)
    # rank 0 alone wrote the outputs, and the manifest lists them; the launch left no job files behind
    assert two == read_manifest(tmp_path / "two")
    assert "adapter/adapter_model.safetensors" in two.files and "loss.png" in two.files
    assert not (tmp_path / "two" / ".launch").exists()
    assert two.fingerprint == one.fingerprint  # model.gpus is not a setting of the result
    # rank 0's progress reached the launcher: every step up to the last
    assert {d for d, _ in seen} >= {0, 1, 2} and {t for _, t in seen} == {2}


@pytest.mark.slow  # three trainings, one of them on two processes: about 80 s on two busy cores
def test_a_checkpoint_of_one_process_resumes_on_two_and_continues_the_same_run(tmp_path: Path) -> None:
    from mathwizard.stages import dpo

    pairs = pairs_folder(tmp_path / "04-pairs", n_train=8, n_val=0)
    cfg = DPOConfig(
        max_steps=4,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        save_steps=2,
        max_length=512,
        warmup_steps=0,
        learning_rate=1e-3,
        eval_steps=None,
        lora=LoRAConfig(r=4, alpha=4, dropout=0.0),
    )
    reference = dpo.run(cfg, ModelConfig(gpus=1), None, pairs, tmp_path / "reference")

    out = tmp_path / "05-dpo"
    with pytest.raises(Interrupted):
        dpo.run(cfg, ModelConfig(gpus=1), None, pairs, out, callbacks=[interrupt_at(3)])
    assert sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*")) == ["checkpoint-2"]

    manifest = dpo.run(cfg, ModelConfig(gpus=2), None, pairs, out)  # the same run, now on two processes
    report = dpo.Report.of(manifest)
    assert (report.resumed_from_step, report.steps, report.processes) == (2, 4, 2)
    assert manifest == read_manifest(out) and "adapter/adapter_model.safetensors" in manifest.files
    # steps 1-2 from the single process, 3-4 from the pair: the same examples in the same order as one process
    # running all four steps (the sampler's permutation and the skipped examples count in effective batches)
    resumed, whole = _losses(out), _losses(tmp_path / "reference")
    assert sorted(resumed) == sorted(whole) == [1, 2, 3, 4]
    for step in whole:
        assert resumed[step] == pytest.approx(whole[step], abs=1e-4), (step, whole, resumed)
    assert report.final_loss == pytest.approx(dpo.Report.of(reference).final_loss, abs=1e-4)


def test_an_effective_batch_that_cannot_be_split_fails_in_one_line(tmp_path: Path) -> None:
    from mathwizard.stages import sft
    from mathwizard.training.parallel import data_parallel_args

    assert data_parallel_args(SFTConfig(), 1, "sft") == {}
    assert data_parallel_args(SFTConfig(), 4, "sft")["gradient_accumulation_steps"] == 2  # 4 x 8 = 4 x 2 x 4 GPUs
    teach = teach_folder(tmp_path / "02-teach", n_train=2, n_val=0)
    cfg = SFTConfig(per_device_train_batch_size=2, gradient_accumulation_steps=3)
    with pytest.raises(ConfigError) as info:
        sft.run(cfg, ModelConfig(gpus=2), teach, tmp_path / "out")
    assert str(info.value) == (
        "sft: the effective batch 2 x 3 = 6 cannot be split over 2 processes: sft.gradient_accumulation_steps (3)"
        " must be a multiple of model.gpus (2); change either (e.g. per_device_train_batch_size x"
        " gradient_accumulation_steps = 3 x 2)"
    )
    assert not (tmp_path / "out").exists()  # refused before anything was written
