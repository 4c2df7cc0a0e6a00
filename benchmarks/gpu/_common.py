"""What the GPU benchmarks share: the E2B-architecture model, data made by the real stages, the card's ceilings,
step statistics and the environment line.

Every figure a benchmark prints comes from one command: baseline and candidates run back to back on the same card.
Training variants of the Unsloth backend run in a process of their own (Unsloth patches transformers and TRL
process-wide when imported), never beside the transformers + PEFT + TRL ones.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib.metadata
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
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
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True)
    info["git"] = (sha.stdout.strip() or "unknown") + (" + work tree" if dirty.stdout.strip() else "")
    return info


def env_line(info: dict[str, Any]) -> str:
    keys = ("gpu", "driver", "torch", "transformers", "trl", "peft", "unsloth", "git", "date")
    return "env: " + " · ".join(f"{k} {info[k]}" for k in keys if k in info)


def fmt(value: Any, spec: str = ",.0f") -> str:
    return "-" if value is None or (isinstance(value, float) and value != value) else format(value, spec)


# ------------------------------------------------------------------------------------------------ the card
def parse_kernels(text: str | None) -> list[str]:
    """`model.kernels` from a benchmark's option: names joined by '+', 'none' for the model's own code, None for the
    setting's default."""
    from mathwizard.config import ModelConfig

    if text is None:
        return ModelConfig().kernels
    return [name for name in text.split("+") if name != "none"]


def datasheet(name: str) -> dict[str, float]:
    for key, peaks in DATASHEET.items():
        if key in name:
            return peaks
    return {"bf16_flops": float("nan"), "hbm_bytes_s": float("nan")}


def card_ceilings(repeats: int = 10) -> dict[str, float]:
    """Measured bf16 matmul FLOP/s (8192^3, random data) and device-to-device copy bandwidth (read + write)."""
    import torch

    if not torch.cuda.is_available():
        return {"matmul_bf16_flops": float("nan"), "copy_bytes_s": float("nan")}

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
    torch.cuda.empty_cache()
    return {"matmul_bf16_flops": 2 * n**3 / matmul_s, "copy_bytes_s": 2 * 2**28 * 4 / copy_s}


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, quartiles and range of per-step times (or any sample)."""
    ordered = sorted(values)
    if not ordered:
        return {}
    quartiles = statistics.quantiles(ordered, n=4) if len(ordered) > 1 else [ordered[0]] * 3
    return {
        "n": len(ordered),
        "median": statistics.median(ordered),
        "p25": quartiles[0],
        "p75": quartiles[2],
        "min": ordered[0],
        "max": ordered[-1],
    }


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


def ensure_data(root: Path) -> dict[str, Path]:
    """The sample's prepare, teach and pairs folders, made by the stages themselves: prepare (bundled MM_Math
    sample), teach with the offline rule teacher, pairs from the tiny model with the rule fallback (a random model
    writes no valid flawed answer, so every rejected answer is the stage's own rule flaw, as in a real run's
    fallback). Each stage skips itself when its folder is finished."""
    from mathwizard.config import ModelConfig, PairsConfig, PrepareConfig, TeacherConfig
    from mathwizard.stages import pairs, prepare, teach

    root = Path(root)
    folders = {"prepare": root / "01-prepare", "teach": root / "02-teach", "pairs": root / "04-pairs"}
    prepare.run(PrepareConfig(source="sample", workers=1), folders["prepare"])
    teach.run(TeacherConfig(kind="rule"), folders["prepare"], folders["teach"], root / "teach-cache")
    pairs_cfg = PairsConfig(max_new_tokens=16, max_attempts=1, fallback="rule", chunk_size=256)
    pairs.run(pairs_cfg, ModelConfig(name="tiny", backend="hf"), "tiny", folders["teach"], folders["pairs"])
    return folders


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def set_up(model: Path, data: Path) -> tuple[Path, dict[str, Any], dict[str, float], dict[str, float]]:
    """What every benchmark does first: the model and the sample's stage folders made if missing, the machine's
    facts printed; returns (model folder, env info, measured card ceilings, datasheet peaks)."""
    model = ensure_e2b(model)
    ensure_data(data)
    info = env_info()
    say(env_line(info))
    return model, info, card_ceilings(), datasheet(info.get("gpu", ""))
