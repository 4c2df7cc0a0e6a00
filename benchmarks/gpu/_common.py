"""What the GPU benchmarks share: the E2B-architecture model and sample data, the card's ceilings, variants run as
subprocesses under a deadline, and the environment line.

Every figure a benchmark prints comes from the same command: the baseline and the candidate run back to back on
the same card, each variant in its own process (Unsloth patches transformers and TRL process-wide when imported, so
the transformers+PEFT+TRL baseline must never share a process with it).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib.metadata
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # run as a script from anywhere: `python benchmarks/gpu/bench_sft.py`
    sys.path.insert(0, str(REPO))

# Vendor datasheet peaks (dense bf16 tensor-core FLOP/s, HBM bytes/s), keyed by a substring of the device name.
DATASHEET = {
    "H100 PCIe": {"bf16_flops": 756e12, "hbm_bytes_s": 2.0e12},
    "H100": {"bf16_flops": 989.4e12, "hbm_bytes_s": 3.35e12},  # SXM5 (the "H100 80GB HBM3")
    "H200": {"bf16_flops": 989.4e12, "hbm_bytes_s": 4.8e12},
    "A100": {"bf16_flops": 312e12, "hbm_bytes_s": 2.0e12},
}
DEFAULT_WORK = Path(os.environ.get("MW_GPU_WORK", REPO / ".gpu" / "work"))  # .gpu/ is git-ignored


# ------------------------------------------------------------------------------------------------- output
def say(*parts: Any) -> None:
    print(*parts, flush=True)


def write_json(path: Path | None, data: dict[str, Any]) -> None:
    if path is None:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(path).with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def versions() -> dict[str, str]:
    """Library versions from their metadata (importing unsloth here would patch transformers)."""
    found = {}
    for name in ("torch", "transformers", "trl", "peft", "accelerate", "unsloth", "unsloth_zoo", "timm", "triton"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "-"
    return found


def env_info() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"), **versions()}
    info["python"] = sys.version.split()[0]
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_gib=round(props.total_memory / 2**30, 1), sms=props.multi_processor_count)
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
            info["driver"] = subprocess.run(query, capture_output=True, text=True, timeout=20).stdout.strip()
    try:  # MW_GIT_SHA: the commit a `git archive` copy without .git was made from
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
        info["git"] = os.environ.get("MW_GIT_SHA") or sha.stdout.strip() or "unknown"
    except OSError:
        info["git"] = os.environ.get("MW_GIT_SHA", "unknown")
    return info


def env_line(info: dict[str, Any]) -> str:
    keys = ("gpu", "driver", "torch", "transformers", "trl", "peft", "unsloth", "git", "date")
    return "env: " + " · ".join(f"{k} {info[k]}" for k in keys if k in info)


# ------------------------------------------------------------------------------------------------ the card
def datasheet(name: str) -> dict[str, float]:
    for key, peaks in DATASHEET.items():
        if key in name:
            return peaks
    return {"bf16_flops": float("nan"), "hbm_bytes_s": float("nan")}


def card_ceilings(repeats: int = 10) -> dict[str, float]:
    """Measured bf16 matmul FLOP/s (8192^3, random data) and device-to-device copy bandwidth (read + write)."""
    import torch

    def timed(fn: Callable[[], Any]) -> float:
        for _ in range(3):
            fn()
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return statistics.median(times)

    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    matmul_s = timed(lambda: a @ b)
    src = torch.randn(2**28, device="cuda", dtype=torch.float32)  # 1 GiB
    dst = torch.empty_like(src)
    copy_s = timed(lambda: dst.copy_(src))
    return {"matmul_bf16_flops": 2 * n**3 / matmul_s, "copy_bytes_s": 2 * src.numel() * 4 / copy_s}


# ----------------------------------------------------------------------------------------- model and data
def ensure_e2b(folder: Path) -> Path:
    """The random gemma-3n E2B-architecture model in `folder`, built on the GPU when it is not there yet."""
    folder = Path(folder)
    if str(folder) == "tiny" or (folder / "mathwizard_model.json").is_file():
        return folder
    from mathwizard.models.random_e2b import build_random_e2b

    started = time.perf_counter()
    build_random_e2b(folder, device="cuda" if _cuda() else "cpu")
    say(f"built the random E2B-architecture model in {folder} ({time.perf_counter() - started:.0f} s)")
    return folder


def ensure_teach(folder: Path) -> Path:
    """A teach stage folder from the bundled MM_Math sample and the offline rule teacher (prepare + teach)."""
    from mathwizard.manifest import read_manifest

    folder = Path(folder)
    if (m := read_manifest(folder)) is not None and m.stage == "teach":
        return folder
    from mathwizard.config import PrepareConfig, TeacherConfig
    from mathwizard.stages import prepare, teach

    prepared = folder.parent / "01-prepare"
    prepare.run(PrepareConfig(source="sample", workers=1), prepared)
    teach.run(TeacherConfig(kind="rule"), prepared, folder, folder.parent / "teach-cache")
    return folder


def ensure_pairs(folder: Path, teach_dir: Path, seed: int = 42) -> Path:
    """A pairs stage folder built from the teach data without a model: chosen = the solution, rejected = the pairs
    stage's own rule flaw (same lengths as real pairs; DPO's cost does not depend on who wrote the rejected text)."""
    from mathwizard.manifest import read_manifest

    folder = Path(folder)
    if (m := read_manifest(folder)) is not None and m.stage == "pairs":
        return folder
    import datasets
    import pyarrow.parquet as pq

    from mathwizard.manifest import stage_output
    from mathwizard.stages.pairs import choose_strategy, rule_flaw

    teach_dir = ensure_teach(teach_dir)
    with stage_output(folder, stage="pairs", version=1, fingerprint=f"bench-rule-pairs-{seed}") as record:
        for split in ("train", "val"):
            rows = []
            for row in pq.read_table(teach_dir / f"{split}.parquet").to_pylist():
                strategy = choose_strategy(str(row["id"]), seed)
                rejected = rule_flaw(row["solution"], strategy)
                if rejected is None:
                    continue
                rows.append(
                    {
                        "id": row["id"],
                        "image": row["image"],
                        "question": row["question"],
                        "chosen": row["solution"],
                        "rejected": rejected,
                        "strategy": strategy,
                        "difficult": row["difficult"],
                        "source": "rule",
                    }
                )
            ds = datasets.Dataset.from_list(rows).cast_column("image", datasets.Image())
            ds.to_parquet(str(folder / f"{split}.parquet"))
            record.add_file(f"{split}.parquet", rows=len(rows))
    return folder


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# ------------------------------------------------------------------------------------------------ variants
def run_variants(
    script: Path,
    variants: list[str],
    worker_args: list[str],
    *,
    deadline: float,
    cap_s: float,
    scratch: Path,
) -> dict[str, dict[str, Any]]:
    """Run `script --worker VARIANT` for each variant in turn, each in its own process group, stopped at
    min(cap_s, time left before `deadline`). A stopped or failed worker still returns the progress it wrote."""
    results: dict[str, dict[str, Any]] = {}
    for variant in variants:
        left = deadline - time.time()
        if left < 60:
            results[variant] = {"variant": variant, "error": f"skipped: {left:.0f} s left before the deadline"}
            say(f"--- {variant}: skipped ({left:.0f} s left)")
            continue
        limit = min(cap_s, left - 15)
        result_file = scratch / f"{variant.replace(':', '-')}.json"
        result_file.unlink(missing_ok=True)
        cmd = [sys.executable, str(script), "--worker", variant, "--result", str(result_file), *worker_args]
        say(f"--- {variant}: {' '.join(cmd[1:])} (stopped after {limit:.0f} s)")
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, start_new_session=True)
        try:
            code = proc.wait(timeout=limit)
            error = None if code == 0 else f"exit code {code}"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            error = f"stopped after {limit:.0f} s (time limit)"
        result = json.loads(result_file.read_text()) if result_file.is_file() else {}
        result.update(variant=variant, wall_s=round(time.perf_counter() - started, 1))
        if error:
            result["error"] = error
        results[variant] = result
        say(f"--- {variant}: {error or 'ok'} in {result['wall_s']} s")
    return results


def fmt(value: Any, spec: str = ",.0f") -> str:
    return "-" if value is None or (isinstance(value, float) and value != value) else format(value, spec)
