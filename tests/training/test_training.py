"""Shared training pieces: data conversion, trainer-argument mapping, checkpoints, metrics and plots."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from mathwizard.config import DPOConfig, SFTConfig
from mathwizard.errors import DataError
from tests.training.builders import pairs_folder, teach_folder


# ---------------------------------------------------------------------------------------------- _trl_args
def test_sft_trl_args_map_our_settings_for_a_cpu() -> None:
    from mathwizard.stages.sft import _trl_args

    cfg = SFTConfig(max_steps=7, per_device_train_batch_size=3, gradient_accumulation_steps=2, eval_steps=5, seed=9)
    args = _trl_args(cfg, Path("/tmp/x/checkpoints"), backend="hf", device="cpu", dtype="float32", has_eval=True)
    assert type(args).__module__.startswith("trl.")
    assert (args.max_steps, args.per_device_train_batch_size, args.gradient_accumulation_steps) == (7, 3, 2)
    assert (args.learning_rate, args.lr_scheduler_type.value, args.warmup_steps) == (2e-4, "cosine", 5)
    assert (args.seed, args.data_seed, args.max_length) == (9, 9, 2048)
    assert args.use_cpu and not args.bf16 and not args.fp16
    assert args.report_to == [] or args.report_to == "none"
    assert args.dataloader_num_workers == 0
    assert args.completion_only_loss is True and args.packing is False
    assert (args.save_strategy.value, args.save_steps, args.save_total_limit) == ("steps", 50, 2)
    assert (args.eval_strategy.value, args.eval_steps) == ("steps", 5)
    assert args.gradient_checkpointing is True
    assert args.remove_unused_columns is False  # the collator needs the raw images
    assert args.output_dir == "/tmp/x/checkpoints"

    no_val = _trl_args(cfg, Path("/tmp/x"), has_eval=False)
    assert no_val.eval_strategy.value == "no"


def test_dpo_trl_args_map_the_original_recipe() -> None:
    from mathwizard.stages.dpo import _trl_args

    args = _trl_args(DPOConfig(), Path("/tmp/x"))
    # original DPO recipe: lr 5e-6 linear, 100 steps, batch 2 x accum 4, beta 0.1, max_length 2048
    assert (args.learning_rate, args.lr_scheduler_type.value, args.max_steps) == (5e-6, "linear", 100)
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (2, 4)
    assert (args.beta, args.max_length, args.save_steps) == (0.1, 2048, 25)
    assert args.truncation_mode == "keep_start" and args.precompute_ref_log_probs is False
    assert args.use_cpu and not args.bf16
    assert args.eval_strategy.value == "no"  # eval_steps None: one evaluation at the end instead


def test_common_args_on_cuda_and_unsloth() -> None:
    from mathwizard.training.args import common_args

    cfg = SFTConfig(pad_to_multiple_of=2048)
    hf = common_args(cfg, Path("o"), backend="hf", device="cuda", dtype="bfloat16", has_eval=False)
    assert hf["bf16"] and not hf["fp16"] and not hf["use_cpu"] and hf["gradient_checkpointing"]
    # Unsloth checkpoints gradients itself ("unsloth" mode); the Trainer must not wrap the model a second time.
    unsloth = common_args(cfg, Path("o"), backend="unsloth", device="cuda", dtype="float16", has_eval=False)
    assert unsloth["fp16"] and not unsloth["bf16"] and not unsloth["gradient_checkpointing"]


# ------------------------------------------------------------------------------------------------- data
def test_sft_records_are_trl_vision_prompt_completion(tmp_path: Path) -> None:
    from mathwizard.prompts import load_prompt
    from mathwizard.training.data import SFT_COLUMNS, read_split, sft_records

    folder = teach_folder(tmp_path / "teach", n_train=3, n_val=1)
    rows = read_split(folder, "train", SFT_COLUMNS)
    records = sft_records(rows)
    assert len(records) == 3 and set(records.column_names) == {"images", "prompt", "completion"}
    first = records[0]
    assert first["images"][0].mode == "RGB" and first["images"][0].size == (40, 30)
    system, user = first["prompt"]
    assert system["role"] == "system" and system["content"][0]["text"] == load_prompt("tutor_system")
    assert user["role"] == "user" and [part["type"] for part in user["content"]] == ["image", "text"]
    assert user["content"][1]["text"] == rows[0]["question"]
    assert first["completion"] == [{"role": "assistant", "content": [{"type": "text", "text": rows[0]["solution"]}]}]
    assert "### Final Answer" in load_prompt("tutor_system")


def test_dpo_records_carry_the_image_and_both_answers(tmp_path: Path) -> None:
    from mathwizard.training.data import DPO_COLUMNS, dpo_records, read_split

    rows = read_split(pairs_folder(tmp_path / "pairs", n_train=2, n_val=1), "train", DPO_COLUMNS)
    records = dpo_records(rows)
    assert set(records.column_names) == {"images", "prompt", "chosen", "rejected"}
    assert records[1]["chosen"][0]["content"][0]["text"] == rows[1]["chosen"]
    assert records[1]["rejected"][0]["content"][0]["text"] == rows[1]["rejected"]
    assert len(records[1]["images"]) == 1


def test_read_split_failures(tmp_path: Path) -> None:
    import datasets

    from mathwizard.training.data import SFT_COLUMNS, read_split

    with pytest.raises(DataError, match=r"train.parquet does not exist"):
        read_split(tmp_path, "train", SFT_COLUMNS)
    assert read_split(tmp_path, "val", SFT_COLUMNS, required=False) is None
    datasets.Dataset.from_dict({"question": ["q"], "image": [None]}).to_parquet(str(tmp_path / "train.parquet"))
    with pytest.raises(DataError, match="lacks column"):
        read_split(tmp_path, "train", SFT_COLUMNS)
    empty = datasets.Dataset.from_dict({"question": [], "solution": [], "image": []})
    empty.to_parquet(str(tmp_path / "train.parquet"))
    with pytest.raises(DataError, match="has no rows"):
        read_split(tmp_path, "train", SFT_COLUMNS)


# ------------------------------------------------------------------------------------------ checkpoints
def test_checkpoints_resume_only_complete_and_matching(tmp_path: Path) -> None:
    from mathwizard.training.checkpoints import last_checkpoint, prepare_checkpoints

    folder = tmp_path / "checkpoints"
    prepare_checkpoints(folder, "fp-a")
    for step in (2, 4, 10):
        (folder / f"checkpoint-{step}").mkdir()
    for step in (2, 4):  # checkpoint-10 was killed mid-save: no trainer_state.json
        (folder / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    assert last_checkpoint(folder) == folder / "checkpoint-4"
    assert not (folder / "checkpoint-10").exists()

    prepare_checkpoints(folder, "fp-a")  # same settings: kept
    assert last_checkpoint(folder) == folder / "checkpoint-4"
    prepare_checkpoints(folder, "fp-b")  # other settings: discarded, never resumed into the wrong schedule
    assert last_checkpoint(folder) is None
    assert (folder / "fingerprint.txt").read_text().strip() == "fp-b"


# ------------------------------------------------------------------------------------------ metrics, plots
def test_metrics_callback_trims_steps_after_the_resumed_checkpoint(tmp_path: Path) -> None:
    from mathwizard.training.metrics import metrics_callback, read_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2, 3)) + '{"step": 4, "lo')
    callback = metrics_callback(path)
    callback.on_train_begin(None, SimpleNamespace(global_step=2), None)
    callback.on_log(
        None, SimpleNamespace(global_step=3, epoch=0.5), None, logs={"loss": 0.25, "grad_norm": float("nan")}
    )
    records = read_metrics(path)
    # steps 1-2 kept (up to the checkpoint), the stale 3 and the torn 4 dropped, the new 3 appended
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[-1] == {"step": 3, "epoch": 0.5, "loss": 0.25, "grad_norm": None}


def test_plots_are_written_for_each_metric(tmp_path: Path) -> None:
    from PIL import Image

    from mathwizard.training.metrics import DPO_PLOTS, plot_metrics

    records = [
        {
            "step": s,
            "loss": 0.7 - 0.01 * s,
            "rewards/accuracies": 0.5,
            "rewards/chosen": 0.01 * s,
            "rewards/rejected": -0.01 * s,
            "rewards/margins": 0.02 * s,
        }
        for s in range(1, 6)
    ] + [{"step": 5, "eval_loss": 0.66, "eval_rewards/margins": 0.05}]
    written = plot_metrics(records, DPO_PLOTS, tmp_path)
    assert [p.name for p in written] == [
        "loss.png",
        "rewards_accuracies.png",
        "rewards_chosen.png",
        "rewards_rejected.png",
        "rewards_margins.png",
    ]
    for path in written:
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size == (600, 400)
