"""The SFT stage on the tiny model: CLI end to end, resume after an interruption, what is trained, errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

# Prefect's logging setup (on `import prefect.main`) and transformers/datasets bind their log handlers to the
# sys.stderr of the moment; done inside a CliRunner call, that stream is closed afterwards and every later CLI
# call in the session fails with "I/O operation on closed file". Importing them at collection avoids it.
import datasets
import prefect.main  # noqa: F401
import pytest
import transformers  # noqa: F401

from mathwizard.config import ModelConfig, SFTConfig
from mathwizard.errors import DataError, ModelError
from mathwizard.manifest import read_manifest
from tests.training.builders import (
    Interrupted,
    interrupt_at,
    teach_folder,
    trainable_snapshot,
    use_session_model_cache,
)


@pytest.fixture(scope="module", autouse=True)
def _models_dir(tmp_path_factory: pytest.TempPathFactory) -> None:
    use_session_model_cache(tmp_path_factory)


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


def test_cli_sft_end_to_end(tmp_path: Path, prefect_harness: None) -> None:
    from typer.testing import CliRunner

    from mathwizard.cli import app
    from mathwizard.models import load_model

    teach = teach_folder(tmp_path / "02-teach", n_train=8, n_val=2)
    out = tmp_path / "03-sft"
    args = ["sft", "--home", str(tmp_path / "home"), "--data", str(teach), "--out", str(out)]
    args += ["--max-steps", "3", "--batch-size", "2", "--grad-accum", "1", "--max-length", "512"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output

    manifest = read_manifest(out)
    assert manifest is not None and manifest.stage == "sft"
    assert manifest.counts == {"train": 8, "val": 2, "steps": 3}
    extra = manifest.extra
    assert (extra["base_model"], extra["backend"], extra["device"], extra["global_step"]) == ("tiny", "hf", "cpu", 3)
    assert extra["train_settings"]["max_steps"] == 3 and extra["train_settings"]["lora"]["r"] == 16
    assert math.isfinite(extra["final_loss"]) and math.isfinite(extra["eval_loss"])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]  # logging_steps=1
    assert [r["step"] for r in records if "eval_loss" in r] == [3]  # one evaluation on val, at the end
    assert (out / "loss.png").stat().st_size > 1000
    assert json.loads((out / "adapter" / "mathwizard_adapter.json").read_text())["base_model"] == "tiny"
    assert "adapter/adapter_model.safetensors" in manifest.files

    _, processor = load_model(out / "adapter", "hf", for_training=False)
    assert processor.tokenizer.padding_side == "left"

    # Same inputs and settings again: skipped (the manifest's own config reproduces its fingerprint).
    from mathwizard.stages import sft

    cfg, model_cfg = SFTConfig(**manifest.config["sft"]), ModelConfig(**manifest.config["model"])
    assert sft.run(cfg, model_cfg, teach, out).created_at == manifest.created_at


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
    assert manifest.extra["resumed_from_step"] == 2
    assert manifest.extra["global_step"] == 4
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
    with pytest.raises(DataError, match=r"train\.parquet has no rows"):
        sft.run(small(), ModelConfig(), empty, tmp_path / "b")
    with pytest.raises(DataError, match=r"no manifest\.json"):
        sft.run(small(), ModelConfig(), tmp_path / "nowhere", tmp_path / "c")


def test_cli_sft_backend_unsloth_without_cuda_is_one_line(tmp_path: Path) -> None:
    import torch
    from typer.testing import CliRunner

    from mathwizard.cli import app

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    teach = teach_folder(tmp_path / "02-teach", n_train=2, n_val=0)
    args = ["sft", "--home", str(tmp_path), "--data", str(teach), "--out", str(tmp_path / "o"), "--backend", "unsloth"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines == ["error: --backend unsloth needs a CUDA GPU and none is visible; use --backend hf (or auto)"]
