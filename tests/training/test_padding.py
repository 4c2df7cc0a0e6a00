"""`pad_to_multiple_of`: training batches padded on the right to a multiple of N tokens, on TRL's collators (SFT and
DPO on the hf path), without changing the loss."""

from __future__ import annotations

from pathlib import Path

import pytest

from mathwizard.config import DPOConfig, LoRAConfig, ModelConfig, SFTConfig
from mathwizard.training.padding import PadToMultiple
from tests.training.builders import pairs_folder, teach_folder

# LoRA dropout off and the model in eval mode: the two batches must meet the same function.
TRAIN = dict(max_steps=1, per_device_train_batch_size=4, max_length=512, eval_steps=None, lora=LoRAConfig(dropout=0.0))


def _collated() -> dict:
    import torch

    return {
        "input_ids": torch.tensor([[5, 6, 7, 8, 9], [5, 6, 7, 0, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]),
        "labels": torch.tensor([[-100, -100, 7, 8, 9], [-100, 6, 7, -100, -100]]),
        "token_type_ids": torch.zeros(2, 5, dtype=torch.long),
        "pixel_values": torch.ones(2, 3, 5, 5),  # [rows, channels, 5, 5]: its dim 1 is not the length
    }


def test_token_tensors_are_padded_on_the_right_to_the_multiple() -> None:
    calls = []
    pad = PadToMultiple(lambda examples: calls.append(examples) or _collated(), 4, pad_token_id=0)
    batch = pad(["a", "b"])
    assert calls == [["a", "b"]]
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 0, 0, 0], [5, 6, 7, 0, 0, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0]]
    assert batch["labels"][:, 5:].eq(-100).all() and batch["labels"][:, :5].tolist() == _collated()["labels"].tolist()
    assert batch["token_type_ids"].shape == (2, 8)
    assert batch["pixel_values"].shape == (2, 3, 5, 5)  # images are not token tensors

    assert PadToMultiple(lambda _: _collated(), 5, 0)([])["input_ids"].shape == (2, 5)  # already a multiple
    assert PadToMultiple(lambda _: _collated(), 64, 0, max_length=6)([])["input_ids"].shape == (2, 6)  # capped
    assert PadToMultiple(lambda _: _collated(), 64, 0, max_length=4)([])["input_ids"].shape == (2, 5)  # never cut


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_a_stages_batches_come_padded_and_train_to_the_same_loss(tmp_path: Path, stage: str) -> None:
    import torch

    from mathwizard.stages import dpo, sft

    losses, lengths = {}, {}
    for multiple in (None, 64):
        out = tmp_path / f"pad-{multiple}"
        if stage == "sft":
            data = teach_folder(tmp_path / "02-teach", n_train=4, n_val=0)
            trainer, _ = sft.build_trainer(SFTConfig(**TRAIN, pad_to_multiple_of=multiple), ModelConfig(), data, out)
        else:
            data = pairs_folder(tmp_path / "04-pairs", n_train=4, n_val=0)
            cfg = DPOConfig(**TRAIN, pad_to_multiple_of=multiple)
            trainer, _ = dpo.build_trainer(cfg, ModelConfig(), None, data, out)
        batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
        lengths[multiple] = batch["input_ids"].shape[1]
        trainer.model.eval()
        with torch.no_grad():
            losses[multiple] = trainer.compute_loss(trainer.model, batch).item()
    assert lengths[64] % 64 == 0 and lengths[None] % 64 != 0 and lengths[64] > lengths[None]
    assert losses[64] == pytest.approx(losses[None], rel=1e-5)
