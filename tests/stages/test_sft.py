"""The SFT stage on the tiny model: what it writes and reports, resume after an interruption, what is trained,
skipping and redoing by manifest, errors."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import datasets
import pytest

from mathwizard.config import ModelConfig, SFTConfig
from mathwizard.errors import DataError, ModelError
from mathwizard.manifest import read_manifest
from tests.training.builders import Interrupted, interrupt_at, teach_folder, trainable_snapshot


def small(**overrides) -> SFTConfig:
    values = dict(
        max_steps=4,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=1,
        save_steps=2,
        max_length=512,
        warmup_steps=0,
        learning_rate=1e-3,
    )
    return SFTConfig(**{**values, **overrides})


def test_sft_writes_the_adapter_metrics_and_report(tmp_path: Path) -> None:
    from mathwizard.models import load_model
    from mathwizard.stages import sft

    teach = teach_folder(tmp_path / "02-teach", n_train=8, n_val=2)
    out = tmp_path / "03-sft"
    cfg = small(max_steps=3, save_steps=50)
    seen: list[tuple[int, int, dict]] = []
    manifest = sft.run(
        cfg, ModelConfig(), teach, out, progress=lambda done, total, **metrics: seen.append((done, total, metrics))
    )

    assert manifest.stage == "sft" and manifest.upstream == {"teach": read_manifest(teach).fingerprint}
    assert manifest == read_manifest(out)
    report = sft.Report.of(manifest)
    assert (report.train_rows, report.val_rows, report.steps, report.resumed_from_step) == (8, 2, 3, None)
    assert (report.base_model, report.backend, report.device, report.dtype) == ("tiny", "hf", "cpu", "float32")
    assert 0 < report.trainable_parameters < report.total_parameters
    assert math.isfinite(report.final_loss) and math.isfinite(report.eval_loss) and math.isfinite(report.train_loss)
    assert report.summary() == f"3 steps on 8 rows, loss {report.final_loss:.4f}, val loss {report.eval_loss:.4f}"
    assert manifest.config["sft"]["max_steps"] == 3 and manifest.config["sft"]["lora"]["r"] == 16
    # the start, every optimizer step up to the total, and each new log's metrics with the step it belongs to
    steps = [done for done, _, _ in seen]
    assert steps == sorted(steps) and set(steps) == {0, 1, 2, 3} and {total for _, total, _ in seen} == {3}
    assert "loss" in seen[-1][2] and "eval_loss" in seen[-1][2]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]  # logging_steps=1
    assert [r["step"] for r in records if "eval_loss" in r] == [1, 2, 3]  # eval_steps 0.1 of 3 steps: every step
    assert (out / "loss.png").stat().st_size > 1000
    assert json.loads((out / "adapter" / "mathwizard_adapter.json").read_text())["base_model"] == "tiny"
    assert "adapter/adapter_model.safetensors" in manifest.files and "loss.png" in manifest.files

    _, processor = load_model(out / "adapter", "hf", for_training=False)
    assert processor.tokenizer.padding_side == "left"

    # Same inputs and settings again: skipped (the manifest's own config reproduces its fingerprint), no progress.
    seen.clear()
    cfg_again, model_again = SFTConfig(**manifest.config["sft"]), ModelConfig(**manifest.config["model"])
    assert sft.run(cfg_again, model_again, teach, out, progress=lambda d, t, **metrics: seen.append((d, t))) == manifest
    assert seen == []

    # The adapter's weights deleted: the stage runs again (from its last checkpoint) and writes them back.
    weights = out / "adapter" / "adapter_model.safetensors"
    weights.unlink()
    again = sft.run(cfg, ModelConfig(), teach, out)
    redone = sft.Report.of(again)
    assert (redone.steps, redone.resumed_from_step) == (3, 3)  # nothing left to train: the final checkpoint
    name = "adapter/adapter_model.safetensors"
    assert again.files[name] == manifest.files[name]  # the very same weights: not a step past max_steps
    assert redone.train_loss == pytest.approx(report.train_loss) and redone.eval_loss == report.eval_loss


def test_sft_resumes_from_the_last_checkpoint_after_an_interruption(tmp_path: Path) -> None:
    import torch

    from mathwizard.models import load_model
    from mathwizard.stages import sft

    teach = teach_folder(tmp_path / "02-teach", n_train=8, n_val=2)
    out, cfg = tmp_path / "03-sft", small(save_merged=True)
    with pytest.raises(Interrupted):
        sft.run(cfg, ModelConfig(), teach, out, callbacks=[interrupt_at(3)])
    assert read_manifest(out) is None  # unfinished: nothing looks done
    assert sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*")) == ["checkpoint-2"]

    manifest = sft.run(cfg, ModelConfig(), teach, out)  # the same command again
    report = sft.Report.of(manifest)
    assert (report.resumed_from_step, report.steps) == (2, 4)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # steps 1-2 from the first run, 3-4 from the resumed one; the interrupted run's step 3 was dropped
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    state = json.loads((out / "checkpoints" / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4

    # merged/ is the adapter folded into the weights: same outputs as base + adapter
    from tests.training.builders import png

    adapter_model, processor = load_model(out / "adapter", "hf", for_training=False)
    merged_model, _ = load_model(out / "merged", "hf", for_training=False)
    from io import BytesIO

    from PIL import Image

    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Find x."}]}],
        add_generation_prompt=True,
        tokenize=False,
    )
    batch = processor(text=[text], images=[[Image.open(BytesIO(png(3))).convert("RGB")]], return_tensors="pt")
    with torch.inference_mode():
        torch.testing.assert_close(merged_model(**batch).logits, adapter_model(**batch).logits, atol=1e-4, rtol=1e-4)


def test_sft_trains_the_lora_parameters_on_the_answer_only(tmp_path: Path) -> None:
    import torch

    from mathwizard.stages import sft

    teach = teach_folder(tmp_path / "02-teach", n_train=4, n_val=0)
    trainer, facts = sft.build_trainer(small(max_steps=2), ModelConfig(), teach, tmp_path / "out")
    assert facts["val_rows"] == 0 and trainer.eval_dataset is None

    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    assert tuple(batch["pixel_values"].shape) == (2, 3, 64, 64)
    tokenizer = trainer.processing_class.tokenizer
    model_turn = tokenizer("<start_of_turn>model\n", add_special_tokens=False)["input_ids"]
    for ids, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist(), strict=True):
        start = next(i for i in range(len(ids)) if ids[i : i + len(model_turn)] == model_turn) + len(model_turn)
        assert all(label == -100 for label in labels[:start])  # system, image, question: no loss
        assert labels[start] == ids[start]  # the answer's first token is trained
        assert 513 not in [label for label in labels if label != -100]  # image soft tokens never are

    before = trainable_snapshot(trainer.model)
    assert any("lora_A" in name for name in before) and any("modules_to_save" in name for name in before)
    trainer.train()
    after = dict(trainer.model.named_parameters())
    for name, value in before.items():
        assert not torch.equal(value, after[name]), f"{name} did not change"


def test_sft_clear_errors(tmp_path: Path) -> None:
    from mathwizard.manifest import stage_output
    from mathwizard.stages import sft

    teach = teach_folder(tmp_path / "02-teach", n_train=2, n_val=0)
    with pytest.raises(ModelError, match=r"model path .*no-such-model does not exist"):
        sft.run(small(), ModelConfig(name=str(tmp_path / "no-such-model")), teach, tmp_path / "a")

    empty = tmp_path / "empty-teach"
    with stage_output(empty, stage="teach", version=1, fingerprint="empty") as record:
        columns = {"id": [], "question": [], "solution": [], "image": []}
        datasets.Dataset.from_dict(columns).to_parquet(str(empty / "train.parquet"))
        record.add_file("train.parquet", rows=0)
    with pytest.raises(DataError, match=r"the train split in .*empty-teach has no rows; check the upstream"):
        sft.run(small(), ModelConfig(), empty, tmp_path / "b")
    with pytest.raises(DataError, match=r"no manifest\.json: .*run `mathwizard teach` first"):
        sft.run(small(), ModelConfig(), tmp_path / "nowhere", tmp_path / "c")

    damaged = tmp_path / "damaged-teach"
    shutil.copytree(teach, damaged)
    (damaged / "train.parquet").write_bytes(b"PAR1")
    with pytest.raises(DataError) as info:
        sft.run(small(), ModelConfig(), damaged, tmp_path / "d")
    assert str(info.value) == (
        f"{damaged} is damaged (train.parquet is 4 bytes, not the "
        f"{read_manifest(teach).files['train.parquet'].bytes:,} recorded); run `mathwizard teach` again to redo it"
    )
    assert not (tmp_path / "d").exists()  # refused before anything was written


def test_tensorboard_curves_are_written_and_readable(tmp_path: Path) -> None:
    """report_to: tensorboard writes event files under the stage folder, one train/loss point per step and the
    validation points, readable by TensorBoard's own reader (offline)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from mathwizard.stages import sft
    from mathwizard.training.callbacks import TENSORBOARD_DIR

    teach = teach_folder(tmp_path / "02-teach", n_train=8, n_val=2)
    out = tmp_path / "03-sft"
    sft.run(small(max_steps=3, save_steps=50, eval_steps=1, report_to="tensorboard"), ModelConfig(), teach, out)
    events = EventAccumulator(str(out / TENSORBOARD_DIR))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3]
    assert [e.step for e in events.Scalars("eval/loss")] == [1, 2, 3]
    assert all(math.isfinite(e.value) for e in events.Scalars("train/loss"))


def test_the_backend_is_active_before_the_progress_callback_imports_transformers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Unsloth patches transformers when imported; the stage's progress callback (a TrainerCallback) imports
    transformers, so with a progress (as in `mathwizard run`) the backend must be activated first."""
    from mathwizard.models import backend
    from mathwizard.stages import sft
    from mathwizard.training import callbacks

    calls: list[str] = []
    monkeypatch.setattr(backend, "activate", lambda name: calls.append(f"activate {name}"))
    real = callbacks.progress_callback
    monkeypatch.setattr(callbacks, "progress_callback", lambda progress: calls.append("progress") or real(progress))

    def stop(*args, **kwargs):
        raise Interrupted

    monkeypatch.setattr(sft, "build_trainer", stop)
    teach = teach_folder(tmp_path / "02-teach", n_train=2, n_val=0)
    with pytest.raises(Interrupted):
        sft.run(small(), ModelConfig(), teach, tmp_path / "03-sft", progress=lambda *a, **k: None)
    assert calls == ["activate hf", "progress"]
