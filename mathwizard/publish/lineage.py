"""What a run's stage folders recorded, read once for the cards, the evaluation gate and the publish fingerprint.

Only manifests, small JSON/JSONL files and parquet metadata (or single small columns) are read: never images
or weights, so this stays cheap enough for a Prefect cache key.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mathwizard.config import STAGE_DIRS
from mathwizard.errors import DataError, MathWizardError
from mathwizard.manifest import Manifest, read_manifest, require_manifest
from mathwizard.stages import evaluate

log = logging.getLogger(__name__)

MM_MATH_REPO = "THU-KEG/MM_Math"
MM_MATH_LICENSE = "MIT"
MM_MATH_PAPER = "arXiv:2404.05091"
MM_MATH_PAPER_URL = "https://arxiv.org/abs/2404.05091"

EVAL_MODELS = ("base", "sft", "dpo")
TEACH_SPLITS = ("train", "val", "test")
PAIRS_SPLITS = ("train", "val")
_STAGES = ("prepare", "teach", "sft", "pairs", "dpo")


@dataclass
class RunInfo:
    """Manifests and eval reports of one run folder; absent stages are None."""

    run_dir: Path
    manifests: dict[str, Manifest | None]
    evals: dict[str, evaluate.Report]
    eval_manifests: dict[str, Manifest | None]

    @classmethod
    def read(cls, run_dir: Path) -> RunInfo:
        run_dir = Path(run_dir)
        manifests = {stage: read_manifest(run_dir / STAGE_DIRS[stage]) for stage in _STAGES}
        evals: dict[str, evaluate.Report] = {}
        eval_manifests: dict[str, Manifest | None] = {}
        for name in EVAL_MODELS:
            folder = run_dir / STAGE_DIRS["eval"] / name
            eval_manifests[name] = read_manifest(folder)
            if (folder / evaluate.REPORT_FILE).is_file():
                evals[name] = evaluate.load_report(folder)
        return cls(run_dir=run_dir, manifests=manifests, evals=evals, eval_manifests=eval_manifests)

    def folder(self, stage: str) -> Path:
        return self.run_dir / STAGE_DIRS[stage]

    def require(self, stage: str) -> Manifest:
        """The stage's manifest, or a DataError naming the command that makes it (or redoes it, when damaged)."""
        return require_manifest(self.folder(stage), stage)  # also checks the files it lists are all still there

    def upstream(self) -> dict[str, str]:
        """Fingerprints of everything the published repos are made from (the cards read all of them)."""
        found = {stage: m.fingerprint for stage, m in self.manifests.items() if m is not None}
        found.update({f"eval-{name}": m.fingerprint for name, m in self.eval_manifests.items() if m is not None})
        return found

    def config(self, stage: str) -> dict[str, Any]:
        manifest = self.manifests.get(stage)
        return dict(manifest.config) if manifest is not None else {}

    def report(self, stage: str) -> dict[str, Any]:
        """The stage's recorded report (see each stage's `Report`), empty when the stage has not run."""
        manifest = self.manifests.get(stage)
        return dict(manifest.report) if manifest is not None else {}

    # ------------------------------------------------------------------------------------- lineage
    def source(self) -> dict[str, str]:
        """Where MM_Math came from: the Hub revision when it was fetched from the Hub."""
        config, extra = self.config("prepare"), self.report("prepare")
        kind = str(find(config, "source") or "unknown")
        repo = str(find(config, "hub_repo") or MM_MATH_REPO)
        keys = ("resolved_revision", "revision", "source_revision", "commit", "sha", "hub_revision")
        revision = next((find(extra, k) for k in keys if find(extra, k)), None) or find(config, "hub_revision")
        if kind == "hub":
            described = str(revision) if revision else "main (not pinned)"
        elif kind == "sample":
            described = "bundled MM_Math-format sample (no Hub revision)"
        elif kind == "local":
            described = f"local copy ({revision})" if revision else "local copy (revision not recorded)"
        else:
            described = str(revision) if revision else "not recorded"
        return {"kind": kind, "repo": repo, "revision": described}

    def teacher(self) -> dict[str, list[str] | str | None]:
        """Teacher model(s) and prompt version(s), as recorded per row in 02-teach (config as fallback)."""
        config = self.config("teach")
        models: list[str] = []
        versions: list[str] = []
        for split in TEACH_SPLITS:
            path = self.folder("teach") / f"{split}.parquet"
            models += [v for v in column_counts(path, "teacher_model") if v not in models]
            versions += [v for v in column_counts(path, "prompt_version") if v not in versions]
        if not models and find(config, "model"):
            models = [str(find(config, "model"))]
        if not versions and find(config, "prompt_version"):
            versions = [str(find(config, "prompt_version"))]
        temperature = find(config, "temperature")
        return {
            "models": models,
            "prompt_versions": versions,
            "kind": None if find(config, "kind") is None else str(find(config, "kind")),
            "temperature": None if temperature is None else str(temperature),
        }

    def base_model(self) -> str | None:
        """The original base model under the adapters: a Hub id or 'tiny' when one was recorded, else a local path.

        Adapters name their base in `mathwizard_adapter.json` (or PEFT's adapter_config.json); a DPO adapter
        trained on the SFT model names that folder, so the chain is followed down to the original base.
        """
        candidates: list[str] = []
        for stage in ("dpo", "sft"):
            value = self.report(stage).get("base_model")
            candidates += [str(value)] if value else []
            candidates += follow_base(self.folder(stage) / "adapter")
        portable = [c for c in candidates if not is_local_path(c)]
        return (portable or candidates or [None])[0]

    def dpo_start(self) -> str | None:
        """What the DPO adapter was trained on, relative to the run folder when it is one of the run's stages."""
        chain = follow_base(self.folder("dpo") / "adapter")
        if not chain:
            return None
        start = chain[0]
        if is_local_path(start):
            try:
                return Path(start).resolve().relative_to(self.run_dir.resolve()).as_posix()
            except ValueError:
                return Path(start).name
        return start

    def backend(self) -> str | None:
        for stage in ("dpo", "sft"):
            value = self.report(stage).get("backend")
            if value:
                return str(value)
        return None

    def training(self, stage: str) -> dict[str, Any]:
        """The settings a training stage ran with (its manifest config; LoRA from adapter_config.json if absent)."""
        config = self.config(stage)
        keys = (
            "learning_rate",
            "lr_scheduler_type",
            "warmup_steps",
            "max_steps",
            "per_device_train_batch_size",
            "gradient_accumulation_steps",
            "max_length",
            "max_prompt_length",
            "beta",
            "seed",
        )
        settings: dict[str, Any] = {key: find(config, key) for key in keys}
        settings["max_steps"] = self.report(stage).get("steps") or settings["max_steps"]  # what ran, epochs or not
        lora = find(config, "lora") or {}
        adapter = read_json(self.folder(stage) / "adapter" / "adapter_config.json")
        settings["lora_r"] = lora.get("r", adapter.get("r"))
        settings["lora_alpha"] = lora.get("alpha", adapter.get("lora_alpha"))
        settings["lora_dropout"] = lora.get("dropout", adapter.get("lora_dropout"))
        targets = lora.get("target_modules", adapter.get("target_modules"))
        settings["target_modules"] = sorted(targets) if isinstance(targets, list | set | tuple) else targets
        settings["modules_to_save"] = lora.get("modules_to_save", adapter.get("modules_to_save"))
        return settings


# ------------------------------------------------------------------------------------------ helpers
def find(config: Mapping[str, Any], key: str) -> Any:
    """`key` at the top of a (possibly nested) config dict, else the shallowest nested occurrence."""
    queue: list[Mapping[str, Any]] = [config]
    while queue:
        current = queue.pop(0)
        if key in current:
            return current[key]
        queue += [v for v in current.values() if isinstance(v, Mapping)]
    return None


def first(mapping: Mapping[str, Any], keys: Iterable[str]) -> Any:
    return next((mapping[k] for k in keys if mapping.get(k)), None)


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def parquet_rows(path: Path) -> int:
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path).metadata.num_rows
    except (OSError, ValueError) as exc:
        raise DataError(f"{path} is not a readable parquet file ({exc}); re-run the stage that wrote it") from None


def column_counts(path: Path, column: str) -> Counter[str]:
    """Value counts of one small column of a parquet file; empty when the file or column is absent."""
    import pyarrow.parquet as pq

    if not Path(path).is_file():
        return Counter()
    try:
        schema = pq.read_schema(path)
        if column not in schema.names:
            return Counter()
        values = pq.read_table(path, columns=[column]).column(column).to_pylist()
    except (OSError, ValueError) as exc:
        raise DataError(f"{path} is not a readable parquet file ({exc}); re-run the stage that wrote it") from None
    return Counter(str(v) for v in values if v is not None)


def failure_summary(path: Path, top: int = 3) -> tuple[int, list[tuple[str, int]]]:
    """Number of records in a failures.jsonl and its most common reasons (first line of each, grouped)."""
    if not Path(path).is_file():
        return 0, []
    reasons: Counter[str] = Counter()
    total = 0
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        total += 1
        try:
            record = json.loads(line)
        except ValueError:
            reasons["unreadable record"] += 1
            continue
        reason = first(record, ("error", "reason", "kind", "message")) if isinstance(record, dict) else None
        if isinstance(reason, Mapping):  # grouped error records: {"message": ..., "count": ...}
            reason = first(reason, ("message", "type"))
        text = " ".join(str(reason).split())[:120] if reason else "unspecified"
        reasons[text] += 1
    return total, reasons.most_common(top)


def adapter_base(adapter_dir: Path) -> str | None:
    """The base model an adapter folder names (see `mathwizard.models.adapter_base`), or None without one."""
    from mathwizard.models import adapter_base as named_base

    try:
        return named_base(Path(adapter_dir))
    except (OSError, ValueError, KeyError, MathWizardError):
        return None


def follow_base(adapter_dir: Path, hops: int = 4) -> list[str]:
    """The chain of bases below an adapter: [its base, that base's base, ...] while they are local adapter folders."""
    chain: list[str] = []
    current: Path | None = Path(adapter_dir)
    while current is not None and len(chain) < hops:
        base = adapter_base(current)
        if base is None or base in chain:
            break
        chain.append(base)
        current = Path(base) if is_local_path(base) and Path(base).is_dir() else None
    return chain


def is_local_path(value: str) -> bool:
    """True for a filesystem path (absolute, relative with ./~, or existing), False for 'tiny' and Hub ids."""
    return value.startswith(("/", "~", ".")) or "\\" in value or (value != "tiny" and Path(value).exists())


def count_lines(path: Path) -> int:
    if not Path(path).is_file():
        return 0
    return sum(1 for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip())
