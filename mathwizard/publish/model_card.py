"""The model repo: the DPO adapter (and, when asked, merged weights) with a model card generated from the run.

Layout: the adapter folder's files at the root (so `PeftModel.from_pretrained(repo)` and
`AutoProcessor.from_pretrained(repo)` work), `sft-adapter/` when the DPO adapter was trained on top of the SFT
adapter (it is needed to rebuild the model), `merged/` with push_merged, `plots/*.png` (training curves),
`eval/<model>.json` (the evaluation reports), and README.md. The card holds no timestamps or absolute paths,
so re-publishing an unchanged run produces byte-identical files and therefore no new commit.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from mathwizard import __version__
from mathwizard.config import STAGE_DIRS, PublishConfig
from mathwizard.errors import ConfigError, DataError
from mathwizard.models import ADAPTER_POINTER, HUB_ID
from mathwizard.publish.layout import copy_file, copy_tree, fmt, md_table, percent, write_card
from mathwizard.publish.lineage import (
    EVAL_MODELS,
    MM_MATH_LICENSE,
    MM_MATH_PAPER,
    MM_MATH_PAPER_URL,
    PAIRS_SPLITS,
    TEACH_SPLITS,
    RunInfo,
    column_counts,
    failure_summary,
    is_local_path,
    parquet_rows,
    read_json,
)

log = logging.getLogger(__name__)


_DIFFICULTY_ORDER = ("easy", "medium", "hard")
_LABELS = {"base": "base", "sft": "SFT", "dpo": "DPO"}
SFT_ADAPTER = "sft-adapter"
_LICENCE_TEXT = {
    "gemma": "The base model is distributed under the [Gemma Terms of Use](https://ai.google.dev/gemma/terms);"
    " this adapter (and any merged weights) is a Model Derivative under those terms.",
}


def stacked_on_sft(info: RunInfo) -> bool:
    """True when the DPO adapter's base is the run's SFT adapter (so using it needs both adapters)."""
    return info.dpo_start() == f"{STAGE_DIRS['sft']}/adapter"


def hub_base_model(info: RunInfo) -> str | None:
    """The base model as a Hub id, or None when it was local or the offline tiny model (no Hub metadata then)."""
    base = info.base_model()
    if base and HUB_ID.fullmatch(base) and not Path(base).exists():
        return base
    return None


def stale_evals(info: RunInfo) -> list[str]:
    """Eval reports made from an earlier version of their stage's model (their upstream fingerprint differs)."""
    stale = []
    for name in ("sft", "dpo"):
        report_manifest, model_manifest = info.eval_manifests.get(name), info.manifests.get(name)
        if report_manifest is None or model_manifest is None or name not in report_manifest.upstream:
            continue
        if report_manifest.upstream[name] != model_manifest.fingerprint:
            stale.append(name)
    return stale


def build_model_repo(info: RunInfo, repo_id: str, folder: Path, cfg: PublishConfig, datasets: dict[str, str]) -> None:
    """Write the model repo folder: adapter, optional merged weights, plots, eval reports and README.md."""
    info.require("dpo")
    adapter = info.folder("dpo") / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise DataError(f"{adapter}/adapter_config.json is missing; re-run `mathwizard dpo`")
    copy_tree(adapter, folder, skip=["README.md"])
    if stacked_on_sft(info):
        copy_tree(info.folder("sft") / "adapter", folder / SFT_ADAPTER, skip=["README.md"])
        _portable_base(folder / SFT_ADAPTER, info)
    _portable_base(folder, info, sft_adapter=SFT_ADAPTER if stacked_on_sft(info) else None)
    if cfg.push_merged:
        merged = info.folder("dpo") / "merged"
        if not merged.is_dir() or not any(merged.iterdir()):
            raise ConfigError(
                f"publish.push_merged needs merged weights in {merged}; set dpo.save_merged=true and re-run"
                " `mathwizard dpo`, or set publish.push_merged=false"
            )
        copy_tree(merged, folder / "merged", skip=["README.md"])
        _portable_base(folder / "merged", info)
    plots = _copy_plots(info, folder / "plots")
    for name, report in info.evals.items():
        (folder / "eval").mkdir(parents=True, exist_ok=True)
        text = json.dumps(report.public(), indent=2, sort_keys=True) + "\n"
        (folder / "eval" / f"{name}.json").write_text(text, encoding="utf-8")
    write_card(model_card(info, repo_id, cfg, datasets=datasets, plots=plots), folder)
    log.info("model repo %s laid out in %s", repo_id, folder)


def model_card(
    info: RunInfo, repo_id: str, cfg: PublishConfig, *, datasets: dict[str, str], plots: list[str]
) -> ModelCard:
    """The card: YAML metadata (licence, base model, datasets, `model-index` eval results) and a body built only from
    what the run recorded."""
    data = ModelCardData(
        model_name=repo_id.split("/")[-1],
        license=cfg.model_license,
        base_model=hub_base_model(info),
        library_name="peft",
        pipeline_tag="image-text-to-text",
        datasets=[*datasets.values(), "THU-KEG/MM_Math"],
        tags=["math", "geometry", "multimodal", "gemma3n", "lora", "sft", "dpo", "trl", "mathwizard"],
        eval_results=eval_results(info, datasets.get("sft_dataset")) or None,
    )
    sections = [
        _intro(info, repo_id, datasets),
        _eval_section(info),
        _lineage_section(info, datasets),
        _training_section(info),
        _plots_section(plots),
        _usage_section(info, repo_id, cfg),
        _licence_section(cfg),
        _provenance_section(info),
    ]
    body = "\n\n".join(s for s in sections if s) + "\n"
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


def eval_results(info: RunInfo, sft_dataset: str | None) -> list[EvalResult]:
    """The published (DPO) model's test results as `model-index` entries, which the Hub's evaluation widget reads.

    The test split is our stable split of MM_Math, published with the SFT dataset (as `test`) when that is
    published too; a report that evaluated an earlier DPO model is left out.
    """
    report = info.evals.get("dpo")
    if report is None or "dpo" in stale_evals(info):
        return []
    dataset = {
        "dataset_type": sft_dataset or "THU-KEG/MM_Math",
        "dataset_name": f"MM_Math geometry, Math Wizard {report.split} split ({report.n:,} problems)",
        "dataset_split": {"val": "validation"}.get(report.split, report.split),
    }
    common = {"task_type": "image-text-to-text", "task_name": "Geometry problem solving", **dataset}
    return [
        EvalResult(
            metric_type="accuracy", metric_name="Accuracy (final boxed answer)", metric_value=report.accuracy, **common
        ),
        EvalResult(
            metric_type="format_rate",
            metric_name="Answers in the Solution / Final Answer format",
            metric_value=report.format_rate,
            **common,
        ),
    ]


# ---------------------------------------------------------------------------------------- sections
def _base_description(info: RunInfo) -> str:
    base = info.base_model()
    if base is None:
        return "a gemma-3n model (base not recorded)"
    if base == "tiny":
        return "a tiny randomly initialised gemma-3n built offline (`tiny`, a demo: its answers are noise)"
    if hub_base_model(info):
        return f"[{base}](https://huggingface.co/{base})"
    return f"a local model `{Path(base).name}`"


def _intro(info: RunInfo, repo_id: str, datasets: dict[str, str]) -> str:
    sft = _dataset_link(datasets.get("sft_dataset"), "teacher-written step-by-step solutions")
    dpo = _dataset_link(datasets.get("dpo_dataset"), "flawed answers sampled from the SFT model")
    return (
        f"# {repo_id.split('/')[-1]}\n\n"
        f"A multimodal math tutor for geometry problems (a figure and a question): {_base_description(info)}"
        f" adapted with LoRA, first by supervised fine-tuning on {sft} from MM_Math, then by direct preference"
        f" optimisation against {dpo}. It answers as numbered steps under `### Solution`, then `### Final Answer`"
        " with one `\\boxed{}`."
    )


def _rejected_source(info: RunInfo) -> str:
    counts = info.report("pairs")
    if counts.get("from_rule"):
        return (
            f"from the SFT model ({counts.get('from_model', 0):,}) and from the rule fallback"
            f" ({counts['from_rule']:,}, where the model gave no usable flawed answer)"
        )
    return "sampled from the SFT model"


def _repo_ref(repo: str | None) -> str:
    return f" ([{repo}](https://huggingface.co/datasets/{repo}))" if repo else ""


def _dataset_link(repo: str | None, text: str) -> str:
    return f"[{text}](https://huggingface.co/datasets/{repo})" if repo else text


def _eval_section(info: RunInfo) -> str:
    if not info.evals:
        return "## Evaluation\n\nNot evaluated in this run (no `06-eval/*/report.json`); run `mathwizard eval`."
    difficulties = sorted(
        {d for report in info.evals.values() for d in report.by_difficulty},
        key=lambda d: (_DIFFICULTY_ORDER.index(d) if d in _DIFFICULTY_ORDER else len(_DIFFICULTY_ORDER), d),
    )
    rows = []
    for name in EVAL_MODELS:
        report = info.evals.get(name)
        if report is None:
            continue
        row = [_LABELS[name], f"{report.n:,}", percent(report.accuracy), percent(report.format_rate)]
        for difficulty in difficulties:
            cell = report.by_difficulty.get(difficulty)
            row.append(f"{percent(cell.accuracy)} (n={cell.n})" if cell else None)
        rows.append(row)
    headers = ["model", "problems", "accuracy", "format followed", *difficulties]
    text = (
        "## Evaluation\n\n"
        "Accuracy of the final `\\boxed{}` answer against MM_Math's on the held-out test split, overall and by"
        " difficulty; *format followed* is the share of answers in the `### Solution` / `### Final Answer` format.\n\n"
        + md_table(headers, rows)
    )
    stale = stale_evals(info)
    if stale:
        names = ", ".join(_LABELS[s] for s in stale)
        text += f"\n\nNote: the {names} report(s) evaluated an earlier version of that model; re-run `mathwizard eval`."
    return text


def _lineage_section(info: RunInfo, datasets: dict[str, str]) -> str:
    source = info.source()
    teacher = info.teacher()
    teach_rows = _rows(info, "teach", TEACH_SPLITS)
    pair_rows = _rows(info, "pairs", PAIRS_SPLITS)
    teach_failures, _ = failure_summary(info.folder("teach") / "failures.jsonl")
    pair_failures, _ = failure_summary(info.folder("pairs") / "failures.jsonl")
    strategies: dict[str, int] = {}
    for split in PAIRS_SPLITS:
        for name, n in column_counts(info.folder("pairs") / f"{split}.parquet", "strategy").items():
            strategies[name] = strategies.get(name, 0) + n
    sft_repo, dpo_repo = datasets.get("sft_dataset"), datasets.get("dpo_dataset")
    lines = [
        "## Data lineage",
        "",
        f"- Source: [{source['repo']}](https://huggingface.co/datasets/{source['repo']}) ({MM_MATH_LICENSE};"
        f" MM-MATH, [{MM_MATH_PAPER}]({MM_MATH_PAPER_URL})), fetched as {source['kind']}, revision:"
        f" {source['revision']}.",
        f"- Teacher: `{fmt(teacher['models']) or 'not recorded'}`, prompt version"
        f" `{fmt(teacher['prompt_versions']) or 'not recorded'}`; {teach_failures:,} item(s) excluded after failed"
        " validation.",
        f"- SFT data{_repo_ref(sft_repo)}: {teach_rows}.",
        f"- DPO pairs{_repo_ref(dpo_repo)}:"
        f" {pair_rows}; rejected answers {_rejected_source(info)}"
        + (f" ({', '.join(f'{k} {v:,}' for k, v in sorted(strategies.items()))})" if strategies else "")
        + f"; {pair_failures:,} item(s) excluded.",
    ]
    return "\n".join(lines)


def _training_section(info: RunInfo) -> str:
    sft, dpo = info.training("sft"), info.training("dpo")
    labels = {
        "learning_rate": "learning rate",
        "lr_scheduler_type": "scheduler",
        "warmup_steps": "warm-up steps",
        "max_steps": "optimizer steps",
        "per_device_train_batch_size": "batch size per device",
        "gradient_accumulation_steps": "gradient accumulation",
        "max_length": "max length (tokens)",
        "max_prompt_length": "max prompt length (tokens)",
        "beta": "DPO beta",
        "lora_r": "LoRA r",
        "lora_alpha": "LoRA alpha",
        "lora_dropout": "LoRA dropout",
        "target_modules": "LoRA target modules",
        "modules_to_save": "modules trained in full",
        "seed": "seed",
    }
    rows = [
        (label, fmt(sft.get(key)), fmt(dpo.get(key)))
        for key, label in labels.items()
        if sft.get(key) is not None or dpo.get(key) is not None
    ]
    backend = info.backend()
    base = info.base_model()
    head = f"- Base model: `{Path(base).name if base and not hub_base_model(info) else base or 'not recorded'}`"
    head += f"; backend: {backend}." if backend else "."
    head += "\n- SFT trains LoRA adapters on the SFT data (loss on the answer only); DPO continues from the SFT model"
    head += " on the pairs, images included."
    start = info.dpo_start()
    if start and start != base:
        head += f" The DPO adapter was trained on top of `{start}`"
        head += f" (published in `{SFT_ADAPTER}/`; merge it first)." if stacked_on_sft(info) else "."
    return "## Training\n\n" + head + "\n\n" + md_table(["setting", "SFT", "DPO"], rows)


def _plots_section(plots: list[str]) -> str:
    if not plots:
        return ""
    lines = ["## Training curves", ""]
    for rel in plots:
        stage, _, name = Path(rel).stem.partition("_")
        title = f"{stage.upper()} {name.replace('_', ' ')}"
        lines.append(f"![{title}]({rel})")
    return "\n".join(lines)


def _usage_section(info: RunInfo, repo_id: str, cfg: PublishConfig) -> str:
    base = hub_base_model(info)
    system = _tutor_prompt()
    code = [
        "from PIL import Image",
        "from peft import PeftModel",
        "from transformers import AutoModelForImageTextToText, AutoProcessor",
        "",
    ]
    code.append(f'BASE = "{base}"' if base else f'BASE = "path/to/base-model"  # trained on: {info.base_model()}')
    code.append(f'processor = AutoProcessor.from_pretrained("{repo_id}")')
    code.append('model = AutoModelForImageTextToText.from_pretrained(BASE, dtype="auto")')
    if stacked_on_sft(info):
        code.append("# the SFT model first: the DPO adapter was trained on top of it")
        code.append(
            f'model = PeftModel.from_pretrained(model, "{repo_id}", subfolder="{SFT_ADAPTER}").merge_and_unload()'
        )
    code.append(f'model = PeftModel.from_pretrained(model, "{repo_id}")')
    code.append("")
    if system:
        code.append("# the tutor instructions the model was trained with (mathwizard prompts v1)")
        code.append(f"SYSTEM = {json.dumps(system)}")
    code.append("messages = [")
    if system:
        code.append('    {"role": "system", "content": [{"type": "text", "text": SYSTEM}]},')
    code += [
        '    {"role": "user", "content": [{"type": "image", "image": Image.open("figure.png")},',
        '                                 {"type": "text", "text": "Find the length of AB."}]},',
        "]",
        "inputs = processor.apply_chat_template(",
        '    messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"',
        ").to(model.device)",
        "output = model.generate(**inputs, max_new_tokens=1024)",
        'print(processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))',
    ]
    text = (
        "## Usage\n\n"
        "With Math Wizard (this project installed), streaming the answer and printing the final one separately:\n\n"
        f'```bash\nmathwizard ask --model {repo_id} --image figure.png "Find the length of AB."\n```\n\n'
        "With transformers and PEFT:\n\n```python\n" + "\n".join(code) + "\n```"
    )
    if cfg.push_merged:
        text += (
            "\n\nMerged weights (no PEFT needed) are in `merged/`:"
            f' `AutoModelForImageTextToText.from_pretrained("{repo_id}", subfolder="merged")`.'
        )
    return text


def _tutor_prompt() -> str | None:
    from mathwizard.errors import MathWizardError
    from mathwizard.prompts import load_prompt

    try:
        return load_prompt("tutor_system")
    except MathWizardError:
        return None


def _licence_section(cfg: PublishConfig) -> str:
    model = _LICENCE_TEXT.get(cfg.model_license, f"Licence: `{cfg.model_license}`.")
    return (
        "## Licence\n\n"
        f"{model} The training data derive from MM_Math ({MM_MATH_LICENSE}); the published datasets are"
        f" {cfg.data_license.upper()}."
    )


def _provenance_section(info: RunInfo) -> str:
    rows = [(stage, fp[:12]) for stage, fp in sorted(info.upstream().items())]
    return (
        "## Provenance\n\n"
        f"Made by the Math Wizard pipeline {__version__}. Fingerprints of the run's stage outputs (a re-run with the"
        " same fingerprints reproduces this repo):\n\n" + md_table(["stage", "fingerprint"], rows)
    )


# ----------------------------------------------------------------------------------------- helpers
def _portable_base(folder: Path, info: RunInfo, sft_adapter: str | None = None) -> None:
    """Replace local paths naming the base model (this machine's folders) by names that work from the repo.

    PEFT records the folder the base was loaded from, and the pointer of a DPO adapter names the SFT adapter's
    folder; neither means anything on the Hub, and both would leak local paths. The Hub id of the original base
    takes their place; a DPO adapter stacked on the SFT adapter points at the repo's `sft_adapter` subfolder
    instead (relative, as `mathwizard.models.adapter_base` resolves it), so a downloaded repo rebuilds the chain.
    """
    base = info.base_model()
    portable = base if base and not is_local_path(base) else None
    config_path = folder / "adapter_config.json"
    config = read_json(config_path)
    value = config.get("base_model_name_or_path")
    if isinstance(value, str) and is_local_path(value):
        config["base_model_name_or_path"] = portable or Path(value).name
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    pointer_path = folder / ADAPTER_POINTER
    pointer = read_json(pointer_path)
    if not pointer:
        return
    pointer.pop("base_model_relative", None)  # relative to this machine's run folder
    for key, value in list(pointer.items()):  # base_model, and root_model when it was a local folder
        if isinstance(value, str) and is_local_path(value):
            pointer[key] = portable or Path(value).name
    if sft_adapter:
        pointer.update(base_model=sft_adapter, base_model_relative=sft_adapter)
    pointer_path.write_text(json.dumps(pointer, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _copy_plots(info: RunInfo, dst: Path) -> list[str]:
    """Training curves of SFT and DPO, renamed `<stage>_<plot>.png`; returns repo-relative paths."""
    copied = []
    for stage in ("sft", "dpo"):
        for png in sorted(info.folder(stage).glob("*.png")):
            target = dst / f"{stage}_{png.name}"
            copy_file(png, target)
            copied.append(f"plots/{target.name}")
    return copied


def _rows(info: RunInfo, stage: str, splits: tuple[str, ...]) -> str:
    found = [
        f"{split} {parquet_rows(info.folder(stage) / f'{split}.parquet'):,}"
        for split in splits
        if (info.folder(stage) / f"{split}.parquet").is_file()
    ]
    return ", ".join(found) + " rows" if found else "rows not found"
