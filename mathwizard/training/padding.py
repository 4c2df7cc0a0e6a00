"""Training batches padded on the right to a multiple of N tokens (`pad_to_multiple_of`), whatever built them.

Batches padded to their longest row take as many shapes as there are row lengths, and some GPU kernels pay once per
shape: cuDNN's attention builds its plans for each new shape (on the H200, `benchmarks/gpu/bench_sft.py`: three SFT
steps of 4.5-5.3 s among ~2 s ones with batches as long as their longest row, one of 3.6 s with batches padded to 64),
compiled layers recompile. Rounding the length up to a multiple of 64 leaves a few shapes for the recipe's rows.
TRL's vision collators (SFT and DPO) refuse `pad_to_multiple_of`, so the trainer's collator, TRL's or Unsloth's, is
wrapped instead: one mechanism on both backends and both stages.
"""

from __future__ import annotations

from typing import Any

# What a padded position holds, per batch key: the tokenizer's pad id for the ids, "no label" for the labels,
# nothing attended or scored in the masks.
PAD_VALUES: dict[str, int | None] = {
    "input_ids": None,
    "labels": -100,
    "attention_mask": 0,
    "completion_mask": 0,
    "assistant_masks": 0,
    "token_type_ids": 0,
    "mm_token_type_ids": 0,
}


class PadToMultiple:
    """A collator that pads the token tensors of `collator`'s batches on the right to a multiple of `multiple`
    (never past `max_length`; a batch already that long stays as it is); other tensors (images) are left alone."""

    def __init__(self, collator: Any, multiple: int, pad_token_id: int, max_length: int | None = None) -> None:
        self.collator, self.multiple, self.pad_token_id, self.max_length = collator, multiple, pad_token_id, max_length

    def __call__(self, examples: list[Any]) -> Any:
        import torch.nn.functional as F

        batch = self.collator(examples)
        length = batch["input_ids"].shape[1]
        target = -(-length // self.multiple) * self.multiple
        if self.max_length is not None:
            target = max(length, min(target, self.max_length))
        if target == length:
            return batch
        for key, value in PAD_VALUES.items():
            tensor = batch.get(key)
            if tensor is not None and tensor.dim() == 2 and tensor.shape[1] == length:
                fill = self.pad_token_id if value is None else value
                batch[key] = F.pad(tensor, (0, target - length), value=fill)
        return batch


def pad_batches(trainer: Any, multiple: int | None, processor: Any, max_length: int | None) -> None:
    """Wrap `trainer`'s collator in `PadToMultiple` (nothing for `multiple` None or 1)."""
    if not multiple or multiple == 1 or isinstance(trainer.data_collator, PadToMultiple):
        return
    tokenizer = getattr(processor, "tokenizer", processor)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    trainer.data_collator = PadToMultiple(trainer.data_collator, multiple, pad_id, max_length)
