"""The DPO stage on the tiny model: what it writes and reports, the image really reaches the loss, resume, errors."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import datasets
import pytest

from mathwizard.config import DPOConfig, ModelConfig, SFTConfig
from mathwizard.errors import DataError, ModelError
from mathwizard.manifest import read_manifest
from tests.training.builders import (
    Interrupted,
    interrupt_at,
    pairs_folder,
    png,
    teach_folder,
    trainable_snapshot,
)


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 03-sft folder (2 steps on the tiny model)."""
    from mathwizard.stages import sft

    root = tmp_path_factory.mktemp("dpo-upstream")
    teach = teach_folder(root / "02-teach", n_train=4, n_val=0)
    cfg = SFTConfig(max_steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=1, max_length=512)
    sft.run(cfg, ModelConfig(), teach, root / "03-sft")
    return root / "03-sft"


def small(**overrides) -> DPOConfig:
    values = dict(
        max_steps=4,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=1,
        save_steps=2,
        max_length=512,
        warmup_steps=0,
    )
    return DPOConfig(**{**values, **overrides})


def test_dpo_writes_the_adapter_on_the_sft_model_and_reports(tmp_path: Path, sft_dir: Path) -> None:
    import torch
    from PIL import Image

    from mathwizard.models import load_model
    from mathwizard.stages import dpo

    pairs = pairs_folder(tmp_path / "04-pairs", n_train=6, n_val=2)
    out = tmp_path / "05-dpo"
    seen: list[tuple[int, int, dict]] = []
    cfg = small(max_steps=3, save_steps=50, save_merged=True)
    manifest = dpo.run(
        cfg,
        ModelConfig(),
        sft_dir,
        pairs,
        out,
        progress=lambda done, total, **metrics: seen.append((done, total, metrics)),
    )

    assert manifest.stage == "dpo" and manifest == read_manifest(out)
    assert manifest.upstream == {"pairs": read_manifest(pairs).fingerprint, "sft": read_manifest(sft_dir).fingerprint}
    report = dpo.Report.of(manifest)
    assert (report.train_rows, report.val_rows, report.dropped_long_prompts, report.steps) == (6, 2, 0, 3)
    assert (report.base_model, report.backend, report.resumed_from_step) == ("tiny", "hf", None)
    assert report.sft_adapter == str((sft_dir / "adapter").resolve())
    rewards = (report.rewards_accuracies, report.rewards_chosen, report.rewards_rejected, report.rewards_margins)
    assert all(value is not None and math.isfinite(value) for value in rewards)
    assert report.summary().startswith("3 steps on 6 rows, loss ")
    assert report.summary().endswith(f", reward accuracy {report.rewards_accuracies:.2f}")
    lora = manifest.config["dpo"]["lora"]
    assert (lora["r"], lora["alpha"], lora["dropout"]) == (4, 4, 0.1)
    # the start, every optimizer step up to the total, and each new log's metrics with the step it belongs to
    steps = [done for done, _, _ in seen]
    assert steps == sorted(steps) and set(steps) == {0, 1, 2, 3} and {total for _, total, _ in seen} == {3}
    assert "loss" in seen[-1][2] and "eval_loss" in seen[-1][2]
    for name in (
        "loss.png",
        "rewards_accuracies.png",
        "rewards_chosen.png",
        "rewards_rejected.png",
        "rewards_margins.png",
    ):
        assert (out / name).stat().st_size > 1000, name
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3]
    assert {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"} <= set(train[0])
    # Step 1 starts from the SFT model, which is also the reference: the DPO loss is -log sigmoid(0) = log 2.
    assert train[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    pointer = json.loads((out / "adapter" / "mathwizard_adapter.json").read_text())
    assert pointer["base_model"] == str((sft_dir / "adapter").resolve())
    relative = (out / "adapter" / pointer["base_model_relative"]).resolve()
    assert relative == (sft_dir / "adapter").resolve() and not pointer["base_model_relative"].startswith("/")

    # base -> SFT merged -> DPO adapter gives the same outputs as merged/ (all three folded together)
    assert "merged/model.safetensors" in manifest.files
    chain, processor = load_model(out / "adapter", "hf", for_training=False)
    merged, _ = load_model(out / "merged", "hf", for_training=False)
    sft_only, _ = load_model(sft_dir / "adapter", "hf", for_training=False)
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Find x."}]}],
        add_generation_prompt=True,
        tokenize=False,
    )
    from io import BytesIO

    batch = processor(text=[text], images=[[Image.open(BytesIO(png(4))).convert("RGB")]], return_tensors="pt")
    with torch.inference_mode():
        expected = merged(**batch).logits
        torch.testing.assert_close(chain(**batch).logits, expected, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(sft_only(**batch).logits, expected, atol=1e-6)  # DPO changed something


def test_dpo_batches_carry_pixels_and_the_image_changes_the_loss(tmp_path: Path, sft_dir: Path) -> None:
    import torch

    from mathwizard.stages import dpo

    pairs = pairs_folder(tmp_path / "04-pairs", n_train=4, n_val=0)
    cfg = small(max_steps=3, learning_rate=5e-3)
    trainer, facts = dpo.build_trainer(cfg, ModelConfig(), sft_dir, pairs, tmp_path / "out")
    assert facts["val_rows"] == 0

    before = trainable_snapshot(trainer.model)
    assert before and all("lora_" in n or "modules_to_save" in n for n in before)
    trainer.train()
    after = dict(trainer.model.named_parameters())
    for name, value in before.items():
        assert not torch.equal(value, after[name]), f"{name} did not change"

    examples = [trainer.train_dataset[i] for i in range(2)]
    batch = trainer.data_collator([dict(e) for e in examples])
    assert "pixel_values" in batch
    assert tuple(batch["pixel_values"].shape[1:]) == (3, 64, 64)
    swapped = [dict(e) for e in examples]
    swapped[0]["images"], swapped[1]["images"] = examples[1]["images"], examples[0]["images"]
    swapped_batch = trainer.data_collator(swapped)
    assert torch.equal(swapped_batch["input_ids"], batch["input_ids"])  # same text, only the figures moved
    assert not torch.equal(swapped_batch["pixel_values"], batch["pixel_values"])

    trainer.model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch).item()
        loss_swapped = trainer.compute_loss(trainer.model, swapped_batch).item()
    assert math.isfinite(loss) and math.isfinite(loss_swapped)
    assert abs(loss - loss_swapped) > 1e-6, (loss, loss_swapped)


def test_dpo_resumes_from_the_last_checkpoint_after_an_interruption(tmp_path: Path, sft_dir: Path) -> None:
    from mathwizard.stages import dpo

    pairs = pairs_folder(tmp_path / "04-pairs", n_train=4, n_val=1)
    out = tmp_path / "05-dpo"
    with pytest.raises(Interrupted):
        dpo.run(small(), ModelConfig(), sft_dir, pairs, out, callbacks=[interrupt_at(3)])
    assert read_manifest(out) is None
    assert sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*")) == ["checkpoint-2"]

    manifest = dpo.run(small(), ModelConfig(), sft_dir, pairs, out)
    report = dpo.Report.of(manifest)
    assert (report.resumed_from_step, report.steps) == (2, 4)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    # eval_steps 0.1 of 4 steps: a validation point at every step, those before the kill restored from checkpoint-2
    assert [r["step"] for r in records if "eval_loss" in r] == [1, 2, 3, 4]


def test_dpo_clear_errors(tmp_path: Path, sft_dir: Path) -> None:
    from mathwizard.manifest import stage_output
    from mathwizard.stages import dpo

    pairs = pairs_folder(tmp_path / "04-pairs", n_train=2, n_val=0)
    with pytest.raises(ModelError, match=r"missing-sft is not an adapter folder; pass the SFT stage folder"):
        dpo.run(small(), ModelConfig(), tmp_path / "missing-sft", pairs, tmp_path / "a")
    damaged = tmp_path / "damaged-sft"
    shutil.copytree(sft_dir, damaged)
    (damaged / "adapter" / "adapter_model.safetensors").unlink()
    with pytest.raises(DataError) as info:
        dpo.run(small(), ModelConfig(), damaged, pairs, tmp_path / "a")
    assert str(info.value) == (
        f"{damaged} is damaged (adapter/adapter_model.safetensors is missing); run `mathwizard sft` again to redo it"
    )
    (tmp_path / "not-sft").mkdir()
    with pytest.raises(ModelError, match="holds no adapter"):
        dpo.run(small(), ModelConfig(), tmp_path / "not-sft", pairs, tmp_path / "b")

    empty = tmp_path / "empty-pairs"
    with stage_output(empty, stage="pairs", version=1, fingerprint="empty") as record:
        columns = {"id": [], "image": [], "question": [], "chosen": [], "rejected": [], "strategy": []}
        datasets.Dataset.from_dict(columns).to_parquet(str(empty / "train.parquet"))
        record.add_file("train.parquet", rows=0)
    with pytest.raises(DataError, match=r"the train split in .*empty-pairs has no rows"):
        dpo.run(small(), ModelConfig(), sft_dir, empty, tmp_path / "c")
    with pytest.raises(DataError, match=r"no manifest\.json: .*run `mathwizard pairs` first"):
        dpo.run(small(), ModelConfig(), sft_dir, tmp_path / "nowhere", tmp_path / "e")
    # prompts (system + 16 image tokens + question) are far above 16 tokens: every pair would be dropped
    with pytest.raises(DataError, match=r"longer than dpo\.max_prompt_length=16"):
        dpo.run(small(max_prompt_length=16), ModelConfig(), sft_dir, pairs, tmp_path / "d")


@pytest.mark.gpu
def test_sft_then_dpo_on_the_unsloth_backend(tmp_path: Path) -> None:
    """The CUDA path end to end on the tiny model (2 steps each); run on the GPU machine with `-m gpu`."""
    import importlib.util

    import torch

    if not torch.cuda.is_available() or importlib.util.find_spec("unsloth") is None:
        pytest.skip("needs CUDA and the gpu extra (unsloth)")
    import unsloth  # noqa: F401  (before transformers, as the backend does)

    from mathwizard.stages import dpo, sft

    teach = teach_folder(tmp_path / "02-teach", n_train=4, n_val=2)
    pairs = pairs_folder(tmp_path / "04-pairs", n_train=4, n_val=0)
    model = ModelConfig(backend="unsloth")
    common = dict(max_steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=1, max_length=512)
    done = sft.run(SFTConfig(**common, pad_to_multiple_of=512, save_merged=True), model, teach, tmp_path / "03-sft")
    assert (sft.Report.of(done).backend, sft.Report.of(done).steps) == ("unsloth", 2)
    assert (tmp_path / "03-sft" / "merged" / "config.json").is_file()
    aligned = dpo.run(DPOConfig(**common), model, tmp_path / "03-sft", pairs, tmp_path / "05-dpo")
    assert (dpo.Report.of(aligned).backend, dpo.Report.of(aligned).steps) == ("unsloth", 2)
    first = json.loads((tmp_path / "05-dpo" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-3)  # the SFT model is the reference
