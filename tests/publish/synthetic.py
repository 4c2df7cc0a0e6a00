"""A small but complete run folder (01-prepare ... 06-eval) written the way the stages write theirs, each manifest
with its stage's typed report (pairs: the counts the cards read, so this builder does not pin that stage's report).

The teach parquet carries `datasets` metadata (Image feature); the pairs parquet is plain pyarrow (image as a
bytes/path struct), so both ways a stage may write its files are covered. Adapters name their bases the way
the training stages do: the SFT adapter a Hub id, the DPO adapter the SFT adapter's absolute folder.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from mathwizard.config import DPOConfig, PairsConfig, PrepareConfig, SFTConfig, TeacherConfig
from mathwizard.manifest import StageReport, stage_output
from mathwizard.models import write_adapter_pointer
from mathwizard.publish.lineage import is_local_path
from mathwizard.stages import dpo as dpo_stage
from mathwizard.stages import evaluate
from mathwizard.stages import prepare as prepare_stage
from mathwizard.stages import sft as sft_stage
from mathwizard.stages import teach as teach_stage

BASE_MODEL = "google/gemma-3n-E2B-it"
LOCAL_BASE_DIR = "/home/someone/.cache/huggingface/hub/models--google--gemma-3n-E2B-it/snapshots/abc"
MM_MATH_COMMIT = "0123456789abcdef0123456789abcdef01234567"
TEACH_ROWS = {"train": 6, "val": 2, "test": 2}
PAIR_ROWS = {"train": 4, "val": 2}
PAIR_STRATEGIES = {
    "train": ["calculation_error", "calculation_error", "misapplied_concept", "broken_process"],
    "val": ["calculation_error", "broken_process"],
}
EVAL = {
    "base": {"accuracy": 0.1, "format_rate": 0.2, "easy": (2, 0.5), "medium": (6, 0.0), "hard": (2, 0.0)},
    "sft": {"accuracy": 0.4, "format_rate": 0.9, "easy": (2, 1.0), "medium": (6, 0.3333), "hard": (2, 0.0)},
    "dpo": {"accuracy": 0.5, "format_rate": 1.0, "easy": (2, 1.0), "medium": (6, 0.5), "hard": (2, 0.0)},
}
DPO_PLOTS = ("loss", "rewards_accuracies", "rewards_chosen", "rewards_rejected", "rewards_margins")


def png(color: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (8, 6)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def _teach_rows(split: str, n: int) -> dict[str, list]:
    difficulties = ["easy", "medium", "hard"]
    return {
        "id": [f"{split}-{i}" for i in range(n)],
        "question": [f"In triangle ABC ({split} {i}), find AB." for i in range(n)],
        "solution": [f"### Solution\n1. Step.\n### Final Answer\n\\boxed{{{i}}}" for i in range(n)],
        "image": [{"bytes": png((10 * i, 0, 0)), "path": None} for i in range(n)],
        "difficult": [difficulties[i % 3] for i in range(n)],
        "source_solution": [f"\\textbf{{Solution:}} \\boxed{{{i}}}" for i in range(n)],
        "teacher_model": ["gpt-4o-mini"] * n,
        "prompt_version": ["v1"] * n,
    }


def _write(
    folder: Path, stage: str, config, upstream: dict[str, str] | None = None, report: StageReport | dict | None = None
) -> str:
    with stage_output(folder, stage=stage, version=1, fingerprint=f"{stage}-fp-{folder.name}", config=config,
                      upstream=upstream) as rec:  # fmt: skip
        if isinstance(report, StageReport):
            rec.report(report)
        elif report is not None:
            rec.manifest.report = dict(report)
        for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "manifest.json"):
            rec.add_file(path.relative_to(folder).as_posix())
    return rec.manifest.fingerprint


def make_run(
    run_dir: Path,
    *,
    accuracies: dict[str, float] | None = None,
    merged: bool = False,
    evals: tuple[str, ...] = ("base", "sft", "dpo"),
    base_model: str = BASE_MODEL,
) -> Path:
    """Write a finished run into `run_dir` and return it. `accuracies` overrides the eval reports' accuracy."""
    from datasets import Dataset, Features, Value
    from datasets import Image as ImageFeature

    run_dir.mkdir(parents=True, exist_ok=True)

    # 01-prepare
    prepare = run_dir / "01-prepare"
    prepare.mkdir()
    for split, n in TEACH_ROWS.items():
        rows = _teach_rows(split, n)
        table = pa.table({k: rows[k] for k in ("id", "question", "difficult")})
        pq.write_table(table, prepare / f"{split}-00000-of-00001.parquet")
    (prepare / "quarantine.jsonl").write_text('{"id": "x", "reason": "missing_image"}\n', encoding="utf-8")
    fps = {
        "prepare": _write(
            prepare,
            "prepare",
            PrepareConfig(source="hub", hub_revision="main"),
            report=prepare_stage.Report(
                source="hub",
                resolved_revision=MM_MATH_COMMIT,
                rows_in=11,
                kept=10,
                quarantined=1,
                resized=0,
                quarantine_reasons={"missing_image": 1},
                splits=dict(TEACH_ROWS),
                workers=1,
            ),
        )
    }

    # 02-teach: written by `datasets`, so the parquet carries the Image feature in its metadata
    teach = run_dir / "02-teach"
    teach.mkdir()
    features = Features(
        {
            "id": Value("string"),
            "question": Value("string"),
            "solution": Value("string"),
            "image": ImageFeature(),
            "difficult": Value("string"),
            "source_solution": Value("string"),
            "teacher_model": Value("string"),
            "prompt_version": Value("string"),
        }
    )
    for split, n in TEACH_ROWS.items():
        Dataset.from_dict(_teach_rows(split, n), features=features).to_parquet(str(teach / f"{split}.parquet"))
    (teach / "failures.jsonl").write_text(
        '{"id": "t1", "error": "final answer disagrees with the source"}\n'
        '{"id": "t2", "error": "final answer disagrees with the source"}\n'
        '{"id": "t3", "error": "timeout"}\n',
        encoding="utf-8",
    )
    taught = teach_stage.Report(
        teacher="openai",
        model="gpt-4o-mini",
        host="api.openai.com",
        prompt_version="v1",
        items=13,
        written=10,
        failed=3,
        cache_hits=0,
        api_calls=14,
        retries=1,
        prompt_tokens=9000,
        completion_tokens=3000,
        seconds=12.5,
        failures_by_reason={"answer_mismatch": 2, "timeout": 1},
        splits={
            "train": teach_stage.SplitCounts(items=8, written=6, failed=2),
            "val": teach_stage.SplitCounts(items=3, written=2, failed=1),
            "test": teach_stage.SplitCounts(items=2, written=2, failed=0),
        },
    )
    (teach / "report.json").write_text(taught.model_dump_json(indent=2), encoding="utf-8")
    fps["teach"] = _write(teach, "teach", TeacherConfig(kind="openai"), {"prepare": fps["prepare"]}, taught)

    # 03-sft
    sft = run_dir / "03-sft"
    _adapter(sft / "adapter", base=base_model, r=16)
    (sft / "loss.png").write_bytes(png((0, 0, 200)))
    fps["sft"] = _write(sft, "sft", SFTConfig(), {"teach": fps["teach"]}, _training(sft_stage.Report, base_model))

    # 04-pairs: plain pyarrow, image as a struct without `datasets` metadata
    pairs = run_dir / "04-pairs"
    pairs.mkdir()
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    for split, n in PAIR_ROWS.items():
        rows = _teach_rows(split, n)
        table = pa.table(
            {
                "id": rows["id"],
                "image": pa.array(rows["image"], type=image_type),
                "question": rows["question"],
                "chosen": rows["solution"],
                "rejected": [s.replace("\\boxed{", "\\boxed{9") for s in rows["solution"]],
                "strategy": PAIR_STRATEGIES[split],
                "difficult": rows["difficult"],
            }
        )
        pq.write_table(table, pairs / f"{split}.parquet")
    (pairs / "failures.jsonl").write_text('{"id": "p1", "error": "no flawed answer after 3 attempts"}\n')
    counts = {"items": 7, "written": 6, "from_model": 6, "from_rule": 0, "failed": 1, "max_new_tokens": 1024}
    fps["pairs"] = _write(pairs, "pairs", PairsConfig(), {"teach": fps["teach"], "sft": fps["sft"]}, counts)

    # 05-dpo: the adapter was trained on the SFT model, so its pointer names the SFT adapter folder
    dpo = run_dir / "05-dpo"
    _adapter(dpo / "adapter", base=str((sft / "adapter").resolve()), r=4)
    for name in DPO_PLOTS:
        (dpo / f"{name}.png").write_bytes(png((0, 150, 0)))
    if merged:
        (dpo / "merged").mkdir()
        (dpo / "merged" / "config.json").write_text('{"model_type": "gemma3n"}\n', encoding="utf-8")
        _safetensors(dpo / "merged" / "model.safetensors", 8)
    trained = _training(
        dpo_stage.Report,
        base_model,
        steps=100,
        dropped_long_prompts=0,
        sft_adapter=str((sft / "adapter").resolve()),
        rewards_accuracies=0.75,
        rewards_chosen=0.1,
        rewards_rejected=-0.1,
        rewards_margins=0.2,
    )
    fps["dpo"] = _write(dpo, "dpo", DPOConfig(), {"pairs": fps["pairs"], "sft": fps["sft"]}, trained)

    # 06-eval/<model>
    for name in evals:
        values = dict(EVAL[name])
        if accuracies and name in accuracies:
            values["accuracy"] = accuracies[name]
        folder = run_dir / "06-eval" / name
        folder.mkdir(parents=True)
        report = evaluate.Report(
            label=name,
            n=10,
            accuracy=values["accuracy"],
            format_rate=values["format_rate"],
            by_difficulty={
                d: evaluate.Score(n=values[d][0], accuracy=values[d][1]) for d in ("easy", "medium", "hard")
            },
            generated_tokens=1200,
            max_new_tokens=1024,
            split="test",
            items=10,
            no_reference=0,
            seconds=3.5,
            model_location=str((run_dir / "05-dpo" / "adapter").resolve()),
        )
        (folder / "report.json").write_text(report.model_dump_json(indent=2), encoding="utf-8")
        upstream = {"teach": fps["teach"], **({name: fps[name]} if name in fps else {})}
        _write(folder, "eval", {"split": "test"}, upstream, report)
    return run_dir


def _training(report: type[StageReport], base_model: str, steps: int = 320, **fields: Any) -> StageReport:
    """A training stage's report as SFT and DPO write it (the numbers are made up; the cards read the names)."""
    return report(
        train_rows=6,
        val_rows=2,
        steps=steps,
        resumed_from_step=None,
        base_model=base_model,
        backend="hf",
        device="cuda",
        dtype="bfloat16",
        trainable_parameters=1000,
        total_parameters=100000,
        train_loss=0.9,
        final_loss=0.8,
        eval_loss=0.85,
        **fields,
    )


def _adapter(folder: Path, *, base: str, r: int) -> None:
    folder.mkdir(parents=True)
    config = {
        "peft_type": "LORA",
        # PEFT records the folder the base was loaded from: a local cache path for a Hub model
        "base_model_name_or_path": base if is_local_path(base) else LOCAL_BASE_DIR,
        "r": r,
        "lora_alpha": r,
        "lora_dropout": 0.05,
        "target_modules": ["q_proj", "v_proj"],
        "task_type": "CAUSAL_LM",
    }
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    write_adapter_pointer(folder, base, "hf")  # as the training stages do
    (folder / "tokenizer_config.json").write_text('{"model_max_length": 2048}\n', encoding="utf-8")
    (folder / "README.md").write_text("# auto-generated by PEFT\n", encoding="utf-8")
    _safetensors(folder / "adapter_model.safetensors", r)


def _safetensors(path: Path, size: int) -> None:
    from safetensors.numpy import save_file

    save_file({"lora_A": np.arange(size * 4, dtype=np.float32).reshape(size, 4)}, str(path))
