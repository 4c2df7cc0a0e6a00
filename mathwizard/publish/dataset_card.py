"""The two dataset repos (SFT and DPO) in the parquet layout `datasets.load_dataset(repo)` reads, with their cards.

Layout: `data/<split>-00000-of-00001.parquet`, written by `datasets.Dataset.to_parquet` (so the file carries its
features), and a README.md whose YAML declares `configs` (split -> file) and `dataset_info` (features, rows and
bytes per split) followed by the card: source, how it was made, schema, licence. The splits are the Hub's names
(`val` becomes `validation`). Each dataset keeps the stage's columns and adds TRL's conversational ones, built by
the same functions the pipeline trains with (`mathwizard.training.data`): the SFT dataset `messages` and
`images`, the DPO dataset `prompt`, `chosen`, `rejected` (assistant turns) and `images`; both go straight into
TRL's trainers and collators.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from huggingface_hub import DatasetCard, DatasetCardData

from mathwizard.config import PublishConfig
from mathwizard.data.splits import read_table
from mathwizard.errors import DataError
from mathwizard.publish.layout import fmt, md_table, size_category, write_card
from mathwizard.publish.lineage import (
    MM_MATH_LICENSE,
    MM_MATH_PAPER,
    MM_MATH_PAPER_URL,
    PAIRS_SPLITS,
    TEACH_SPLITS,
    RunInfo,
    column_counts,
    count_lines,
    failure_summary,
    find,
    parquet_rows,
)

log = logging.getLogger(__name__)

DatasetKind = Literal["sft", "dpo"]
HUB_SPLITS = {"train": "train", "val": "validation", "test": "test"}  # the pipeline's split -> the Hub's name

COLUMN_DOCS = {
    "id": "Stable content hash of the MM_Math problem (the same id in both datasets).",
    "question": "The problem statement (LaTeX), as in MM_Math.",
    "solution": "The teacher's rewrite: `### Solution` with numbered steps, then `### Final Answer` with one"
    " `\\boxed{}`.",
    "image": "The problem's figure: PNG, RGB, longest side resized down to the prepare stage's limit.",
    "difficult": "Difficulty given by MM_Math (easy, medium, hard).",
    "source_solution": "MM_Math's original LaTeX solution.",
    "teacher_model": "The model that rewrote the solution.",
    "prompt_version": "The teacher prompt set used (mathwizard/prompts/<version>).",
    "year": "School grade given by MM_Math.",
    "knowledge": "Knowledge points given by MM_Math.",
    "file_name": "The figure's file name in MM_Math.",
    "chosen": "Preferred answer, the teacher's solution, as one assistant turn (TRL's conversational format).",
    "rejected": "Dispreferred answer, a deliberately flawed solution in the same format, as one assistant turn.",
    "messages": "TRL's conversational format: the tutor instructions (system), the figure and question (user),"
    " the solution (assistant), as the pipeline trained on them; the figure is `images[0]`.",
    "prompt": "TRL's conversational prompt: the tutor instructions (system), the figure and question (user);"
    " the figure is `images[0]`.",
    "images": "The figure as a one-element list, where TRL's vision collators look for it.",
    "strategy": "The flaw the SFT model was asked for: calculation_error, misapplied_concept or broken_process.",
    "source": "Who wrote the rejected answer: model (the SFT model) or rule (the deterministic fallback).",
}


@dataclass
class DatasetSpec:
    """Which stage folder feeds a dataset repo, and how to describe it."""

    kind: DatasetKind
    stage: str
    splits: tuple[str, ...]
    title: str
    summary: str


SPECS: dict[DatasetKind, DatasetSpec] = {
    "sft": DatasetSpec(
        "sft",
        "teach",
        TEACH_SPLITS,
        "Math Wizard SFT: MM_Math geometry problems with step-by-step teacher solutions",
        "Multimodal geometry problems from MM_Math (question + figure) paired with a clear, numbered solution"
        " written by a teacher LLM from the original solution. Used for supervised fine-tuning.",
    ),
    "dpo": DatasetSpec(
        "dpo",
        "pairs",
        PAIRS_SPLITS,
        "Math Wizard DPO: preference pairs on MM_Math geometry problems",
        "Preference pairs for direct preference optimisation: for each problem (question + figure) the teacher's"
        " solution is `chosen` and a subtly flawed answer sampled from the SFT model is `rejected`.",
    ),
}


def source_files(info: RunInfo, kind: DatasetKind) -> dict[str, Path]:
    """The stage's parquet per split (only those that exist); DataError when the stage produced none."""
    spec = SPECS[kind]
    info.require(spec.stage)
    folder = info.folder(spec.stage)
    found = {split: folder / f"{split}.parquet" for split in spec.splits if (folder / f"{split}.parquet").is_file()}
    if "train" not in found:
        raise DataError(f"{folder}/train.parquet is missing; re-run `mathwizard {spec.stage}`")
    return found


def build_dataset_repo(info: RunInfo, kind: DatasetKind, repo_id: str, folder: Path, cfg: PublishConfig) -> None:
    """Write the repo folder for the `kind` dataset: data files and README.md."""
    files = source_files(info, kind)
    sizes: dict[str, SplitSize] = {}
    features = None
    for split, path in files.items():
        ds = trl_dataset(kind, path)
        name = HUB_SPLITS[split]
        target = folder / "data" / f"{name}-00000-of-00001.parquet"
        _to_parquet(ds, target)
        sizes[name] = SplitSize(rows=ds.num_rows, num_bytes=ds.data.nbytes, download_bytes=target.stat().st_size)
        features = features or ds.features
    card = dataset_card(info, kind, repo_id, cfg, sizes=sizes, features=features, files=files)
    write_card(card, folder)
    log.info("dataset repo %s laid out in %s (%s rows)", repo_id, folder, sum(s.rows for s in sizes.values()))


@dataclass
class SplitSize:
    """A published split's rows, its size as Arrow data (`datasets`' num_bytes) and its parquet file's size."""

    rows: int
    num_bytes: int
    download_bytes: int


def trl_dataset(kind: DatasetKind, path: Path):
    """The stage's split with TRL's conversational columns added (DPO: `chosen`/`rejected` become assistant turns).

    The images are copied as stored (bytes), never decoded and re-encoded.
    """
    import datasets

    from mathwizard.training.data import assistant, tutor_prompt

    table = read_table(path.parent, path.stem)
    seed = _features(path)
    columns = {name: table.column(name).to_pylist() for name in table.column_names}
    images = [[image] for image in columns["image"]]
    prompts = [tutor_prompt(question) for question in columns["question"]]
    messages = _messages_feature()
    if kind == "sft":
        columns["messages"] = [p + assistant(answer) for p, answer in zip(prompts, columns["solution"], strict=True)]
        features = {**seed, "messages": messages}
    else:
        columns["prompt"] = prompts
        columns["chosen"] = [assistant(text) for text in columns["chosen"]]
        columns["rejected"] = [assistant(text) for text in columns["rejected"]]
        features = {**seed, "prompt": messages, "chosen": messages, "rejected": messages}
    columns["images"] = images
    features["images"] = datasets.List(datasets.Image())
    return datasets.Dataset.from_dict(columns, features=datasets.Features(features))


def _to_parquet(ds, target: Path) -> None:
    """`Dataset.to_parquet` without its progress bar (it would land in the command line's output)."""
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    target.parent.mkdir(parents=True, exist_ok=True)
    quiet = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        ds.to_parquet(str(target))
    finally:
        if not quiet:
            enable_progress_bars()


def _messages_feature():
    import datasets

    content = datasets.List({"type": datasets.Value("string"), "text": datasets.Value("string")})
    return datasets.List({"role": datasets.Value("string"), "content": content})


def dataset_card(
    info: RunInfo,
    kind: DatasetKind,
    repo_id: str,
    cfg: PublishConfig,
    *,
    sizes: dict[str, SplitSize],
    features: object,
    files: dict[str, Path],
) -> DatasetCard:
    """The card: YAML metadata (licence, configs, dataset_info) and a body built only from what the run recorded."""
    from datasets import SplitDict, SplitInfo
    from datasets.info import DatasetInfo, DatasetInfosDict
    from datasets.utils.metadata import MetadataConfigs

    spec = SPECS[kind]
    data = DatasetCardData(
        license=cfg.data_license,
        pretty_name=spec.title,
        task_categories=["image-text-to-text"],
        tags=["math", "geometry", "multimodal", "mm-math", kind, "mathwizard"],
        size_categories=[size_category(sum(s.rows for s in sizes.values()))],
    )
    data_files = [{"split": split, "path": f"data/{split}-*"} for split in sizes]
    MetadataConfigs({"default": {"data_files": data_files}}).to_dataset_card_data(data)
    splits = SplitDict({n: SplitInfo(n, num_bytes=s.num_bytes, num_examples=s.rows) for n, s in sizes.items()})
    dataset_info = DatasetInfo(
        features=features,
        splits=splits,
        download_size=sum(s.download_bytes for s in sizes.values()),
        dataset_size=sum(s.num_bytes for s in sizes.values()),
    )
    DatasetInfosDict({"default": dataset_info}).to_dataset_card_data(data)

    sections = [
        f"# {spec.title}",
        spec.summary,
        _source_section(info),
        _how_made_section(info, kind, files),
        "## Splits\n\n"
        + md_table(["split", "rows", "parquet"], [(n, f"{s.rows:,}", _mb(s.download_bytes)) for n, s in sizes.items()]),
        _schema_section(features),
        _usage_section(repo_id, kind),
        _licence_section(info, cfg),
    ]
    body = "\n\n".join(s for s in sections if s) + "\n"
    return DatasetCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


# ---------------------------------------------------------------------------------------- sections
def _source_section(info: RunInfo) -> str:
    source = info.source()
    return (
        "## Source\n\n"
        f"- Dataset: [{source['repo']}](https://huggingface.co/datasets/{source['repo']}), "
        f"licence {MM_MATH_LICENSE}; paper: MM-MATH, [{MM_MATH_PAPER}]({MM_MATH_PAPER_URL}).\n"
        f"- Fetched as: {source['kind']}; revision: {source['revision']}."
    )


def _how_made_section(info: RunInfo, kind: DatasetKind, files: dict[str, Path]) -> str:
    prepare = info.config("prepare")
    lines = ["## How it was made", "", "Built by the Math Wizard pipeline (`mathwizard run`):", ""]
    size = find(prepare, "max_image_size")
    splits = find(prepare, "splits")
    salt = find(prepare, "split_salt")
    prep = "1. `prepare`: rows with a missing or unreadable figure are quarantined; figures converted to RGB PNG"
    prep += f" and resized to at most {size} px on the longest side" if size else ""
    if splits:
        prep += f"; split train/val/test {fmt(splits)} by a salted content hash ({salt or 'salt not recorded'})"
    prep += "."
    prepared = _split_counts(info, "prepare")
    if prepared:
        prep += f" Rows: {prepared}"
        prep += f"; quarantined {count_lines(info.folder('prepare') / 'quarantine.jsonl'):,}."
    lines.append(prep)

    teacher = info.teacher()
    models = fmt(teacher["models"]) or "not recorded"
    versions = fmt(teacher["prompt_versions"]) or "not recorded"
    if teacher["kind"] == "rule":  # the offline demo teacher: a deterministic reformatting, no model
        teach = f"2. `teach`: the offline rule-based teacher (`{models}`, prompt version `{versions}`) reformatted"
    else:
        teach = f"2. `teach`: teacher model `{models}` (prompt version `{versions}`"
        teach += f", temperature {teacher['temperature']})" if teacher["temperature"] is not None else ")"
        teach += " rewrote"
    teach += " each source solution into numbered steps and a final `\\boxed{}` answer."
    failures, reasons = failure_summary(info.folder("teach") / "failures.jsonl")
    teach += f" Items whose replies still failed validation after retries were excluded: {failures:,}"
    teach += f" ({_reasons(reasons)})." if reasons else "."
    lines.append(teach)

    if kind == "dpo":
        pairs = info.config("pairs")
        used = {key: find(pairs, key) for key in ("temperature", "top_p", "max_new_tokens")}
        used["max_new_tokens"] = info.report("pairs").get("max_new_tokens") or used["max_new_tokens"]  # the budget
        sampling = ", ".join(f"{key} {value}" for key, value in used.items() if value is not None)
        strategies: dict[str, int] = {}
        for path in files.values():
            for name, n in column_counts(path, "strategy").items():
                strategies[name] = strategies.get(name, 0) + n
        step = "3. `sft` then `pairs`: the SFT model was asked for a subtly flawed answer in the same format"
        step += f" ({sampling})" if sampling else ""
        step += " under one of three strategies"
        step += f" ({', '.join(f'{k}: {v:,}' for k, v in sorted(strategies.items()))})" if strategies else ""
        step += "; `chosen` is the teacher's solution, `rejected` the flawed answer."
        step += _rule_fallback(info)
        failed, why = failure_summary(info.folder("pairs") / "failures.jsonl")
        step += f" Items without a usable flawed answer were excluded: {failed:,}"
        step += f" ({_reasons(why)})." if why else "."
        lines.append(step)

    counted = _recorded_counts(info, "teach" if kind == "sft" else "pairs")
    if counted:
        lines += ["", f"Counts recorded by the stage: {counted}."]
    return "\n".join(lines)


def _schema_section(features: object) -> str:
    rows = [(name, _dtype(feature), COLUMN_DOCS.get(name, "")) for name, feature in features.items()]  # type: ignore[attr-defined]
    return "## Schema\n\n" + md_table(["column", "type", "description"], rows)


def _usage_section(repo_id: str, kind: DatasetKind) -> str:
    if kind == "sft":
        trl = (
            '# TRL: SFTTrainer(model=..., train_dataset=ds["train"], args=SFTConfig(...)) trains on `messages`\n'
            "# with `images`; its vision collator is trl.trainer.sft_trainer.DataCollatorForVisionLanguageModeling\n"
        )
    else:
        trl = (
            '# TRL: DPOTrainer(model=..., train_dataset=ds["train"], args=DPOConfig(...)) trains on `prompt`,\n'
            "# `chosen` and `rejected` with `images`; its collator is\n"
            "# trl.trainer.dpo_trainer.DataCollatorForVisionPreference\n"
        )
    return (
        "## Usage\n\n"
        "```python\n"
        "from datasets import load_dataset\n\n"
        f'ds = load_dataset("{repo_id}")\n'
        'row = ds["train"][0]\n'
        'row["image"]  # a PIL image\n' + trl + "```\n\n"
        "The splits are `train`, `validation`" + (" and `test`" if kind == "sft" else "") + "."
    )


def _licence_section(info: RunInfo, cfg: PublishConfig) -> str:
    models = fmt(info.teacher()["models"]) or "the teacher model"
    return (
        "## Licence\n\n"
        f"{cfg.data_license.upper()}, following MM_Math ({MM_MATH_LICENSE}). The rewritten solutions were generated"
        f" by {models}; check that provider's terms for your use."
    )


# ----------------------------------------------------------------------------------------- helpers
def _features(path: Path) -> object:
    """The parquet's `datasets` features; an image struct without metadata becomes an Image feature."""
    import pyarrow.parquet as pq
    from datasets import Features, Image

    features = Features.from_arrow_schema(pq.read_schema(path))
    for name, feature in list(features.items()):
        if isinstance(feature, dict) and set(feature) == {"bytes", "path"}:
            features[name] = Image()
    if "image" not in features:
        raise DataError(f"{path} has no image column; re-run the stage that wrote it")
    return features


def _dtype(feature: object) -> str:
    from datasets import Image, List, Value

    if isinstance(feature, Image):
        return "image"
    if isinstance(feature, Value):
        return feature.dtype
    if isinstance(feature, List):
        return "list of images" if isinstance(feature.feature, Image) else "list of messages"
    return type(feature).__name__


def _mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB" if size >= 100_000 else f"{size / 1e3:.1f} kB"


def _split_counts(info: RunInfo, stage: str) -> str:
    folder = info.folder(stage)
    found = []
    for split in TEACH_SPLITS:
        for name in (f"{split}-00000-of-00001.parquet", f"{split}.parquet"):
            if (folder / name).is_file():
                found.append(f"{split} {parquet_rows(folder / name):,}")
                break
    return ", ".join(found)


_RECORDED = {
    "teach": ("items", "written", "failed"),
    "pairs": ("items", "written", "from_model", "from_rule", "failed"),
}


def _recorded_counts(info: RunInfo, stage: str) -> str:
    report = info.report(stage)
    return ", ".join(f"{key} {report[key]:,}" for key in _RECORDED[stage] if key in report)


def _rule_fallback(info: RunInfo) -> str:
    """How many rejected answers the rule fallback wrote (when the model gave no usable flawed answer)."""
    counts = info.report("pairs")
    if not counts.get("from_rule"):
        return ""
    return (
        f" {counts['from_rule']:,} of the rejected answers were written by the rule fallback (a deterministic flaw"
        f" in the chosen answer) because the model gave no usable one; {counts.get('from_model', 0):,} come from"
        " the model."
    )


def _reasons(reasons: Sequence[tuple[str, int]]) -> str:
    return "; ".join(f"{text} ×{n}" for text, n in reasons)
