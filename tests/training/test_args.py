"""Our training settings as TRL's arguments (`training/args.py`, each stage's `_trl_args`): pure, no model or data."""

from __future__ import annotations

from pathlib import Path

from mathwizard.config import DPOConfig, SFTConfig


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

    args = _trl_args(DPOConfig(max_steps=100), Path("/tmp/x"))
    # original DPO recipe: lr 5e-6 linear, 100 steps, batch 2 x accum 4, beta 0.1, max_length 2048
    assert (args.learning_rate, args.lr_scheduler_type.value, args.max_steps) == (5e-6, "linear", 100)
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (2, 4)
    assert (args.beta, args.max_length, args.save_steps) == (0.1, 2048, 25)
    assert args.truncation_mode == "keep_start" and args.precompute_ref_log_probs is False
    assert args.use_cpu and not args.bf16
    assert (args.eval_strategy.value, args.eval_steps) == ("steps", 0.1)  # ten validation points on the curves
    assert _trl_args(DPOConfig(eval_steps=None), Path("/tmp/x")).eval_strategy.value == "no"  # one at the end
    # By default the length scales with the data: 0.15 passes over the pairs (about 100 steps on MM_Math).
    default = _trl_args(DPOConfig(), Path("/tmp/x"))
    assert (default.max_steps, default.num_train_epochs) == (-1, 0.15)


def test_report_to_reaches_the_trainer_and_tensorboard_writes_in_the_stage_folder(tmp_path: Path) -> None:
    from mathwizard.stages.sft import _trl_args
    from mathwizard.training.callbacks import TENSORBOARD_DIR, tensorboard_callback

    assert _trl_args(SFTConfig(report_to="mlflow"), tmp_path).report_to == ["mlflow"]
    # TensorBoard's writer is ours, so the Trainer's own integration stays off and the files land in the stage folder
    assert _trl_args(SFTConfig(report_to="tensorboard"), tmp_path).report_to == []
    callback = tensorboard_callback(tmp_path)
    callback.tb_writer.add_scalar("train/loss", 1.5, 1)
    callback.tb_writer.close()
    assert list((tmp_path / TENSORBOARD_DIR).glob("events.out.tfevents.*"))


def test_common_args_on_cuda_and_unsloth() -> None:
    from mathwizard.training.args import common_args

    cfg = SFTConfig(pad_to_multiple_of=2048)
    hf = common_args(cfg, Path("o"), backend="hf", device="cuda", dtype="bfloat16", has_eval=False)
    assert hf["bf16"] and not hf["fp16"] and not hf["use_cpu"] and hf["gradient_checkpointing"]
    # Unsloth checkpoints gradients itself ("unsloth" mode); the Trainer must not wrap the model a second time.
    unsloth = common_args(cfg, Path("o"), backend="unsloth", device="cuda", dtype="float16", has_eval=False)
    assert unsloth["fp16"] and not unsloth["bf16"] and not unsloth["gradient_checkpointing"]
