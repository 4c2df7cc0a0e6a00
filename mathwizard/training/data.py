"""Stage parquet files -> the conversational vision formats TRL trains on.

SFT rows become `{"images": [PIL], "prompt": [system, user(image + question)], "completion": [assistant]}`:
TRL then picks its vision collator and puts the loss on the completion only. DPO rows become the same prompt
with `"chosen"` / `"rejected"` assistant turns. The prompt is the one the pairs, eval and ask stages generate
from (`mathwizard.generation.chat_messages` with the `tutor_system` prompt), so training and use agree.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

SFT_COLUMNS = ("question", "solution", "image")
RECORDS_VERSION = 1  # bump when the record layout below changes (part of the map fingerprint)
DPO_COLUMNS = ("question", "chosen", "rejected", "image")


def tutor_prompt(question: str, system: str | None = None) -> list[dict[str, Any]]:
    """The prompt turns: tutor instructions (system, merged into the user turn by the template), image, question."""
    from mathwizard.generation import Request, chat_messages
    from mathwizard.prompts import load_prompt

    return chat_messages(Request(text=question, image=None, system=system or load_prompt("tutor_system")))


def assistant(text: str) -> list[dict[str, Any]]:
    return [{"role": "assistant", "content": [{"type": "text", "text": text}]}]


def _rgb(image: Any) -> Any:
    return image if image.mode == "RGB" else image.convert("RGB")


def sft_records(ds, system: str | None = None):
    """SFT rows in TRL's vision prompt-completion format."""
    import datasets

    def convert(row: dict[str, Any]) -> dict[str, Any]:
        return {
            "images": [_rgb(row["image"])],
            "prompt": tutor_prompt(row["question"], system),
            "completion": assistant(row["solution"]),
        }

    features = datasets.Features(
        {
            "images": datasets.Sequence(datasets.Image()),
            "prompt": _messages_feature(),
            "completion": _messages_feature(),
        }
    )
    return _map(ds, convert, features, "sft", system)


def dpo_records(ds, system: str | None = None):
    """Preference rows in TRL's vision DPO format (the image reaches the model through `images`)."""
    import datasets

    def convert(row: dict[str, Any]) -> dict[str, Any]:
        return {
            "images": [_rgb(row["image"])],
            "prompt": tutor_prompt(row["question"], system),
            "chosen": assistant(row["chosen"]),
            "rejected": assistant(row["rejected"]),
        }

    features = datasets.Features(
        {
            "images": datasets.Sequence(datasets.Image()),
            "prompt": _messages_feature(),
            "chosen": _messages_feature(),
            "rejected": _messages_feature(),
        }
    )
    return _map(ds, convert, features, "dpo", system)


def _map(ds, convert, features, kind: str, system: str | None):
    """`ds.map(convert)` in memory, with a fingerprint of our own.

    Without one, `datasets` fingerprints the transform by pickling the `convert` closure with dill, which
    disassembles its bytecode: under Prefect's `log_prints` that printed about a hundred lines of `LOAD_GLOBAL`
    into every SFT and DPO log. The input's fingerprint, the record kind and the system prompt decide the output.
    """
    from mathwizard.manifest import stable_hash

    fingerprint = stable_hash("records", RECORDS_VERSION, kind, ds._fingerprint, system)[:16]
    return ds.map(
        convert, remove_columns=ds.column_names, features=features, keep_in_memory=True, new_fingerprint=fingerprint
    )


def prompt_lengths(records, processor) -> list[int]:
    """Tokens of each record's rendered prompt, with its image expanded to the soft tokens the model sees."""
    lengths = []
    tokenizer = processor.tokenizer
    for prompt in records["prompt"]:
        text = processor.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        text = text.replace(processor.image_token, processor.full_image_sequence)
        lengths.append(len(tokenizer(text, add_special_tokens=False)["input_ids"]))
    return lengths


def _messages_feature():
    import datasets

    return datasets.List(
        {
            "role": datasets.Value("string"),
            "content": datasets.List({"type": datasets.Value("string"), "text": datasets.Value("string")}),
        }
    )
