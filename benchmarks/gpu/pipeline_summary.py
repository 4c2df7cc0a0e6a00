"""Collect what an end-to-end run left behind (each stage's manifest, the pairs and eval reports) into one JSON.

Usage: python benchmarks/gpu/pipeline_summary.py <home>/runs/<run_name> --json pipeline.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _common import env_info, write_json

# Report fields printed per stage (the JSON keeps every field).
SHOWN = ("steps", "backend", "device", "train_rows", "written", "generated_tokens", "decode", "final_loss", "accuracy")


def stage_summary(folder: Path) -> dict:
    manifest = json.loads((folder / "manifest.json").read_text())
    summary = {"seconds": manifest.get("seconds"), "report": manifest.get("report", {})}  # the stage's typed report
    for name in ("report.json", "metrics.jsonl"):
        path = folder / name
        if path.is_file() and name == "report.json":
            summary["report_json"] = {k: v for k, v in json.loads(path.read_text()).items() if k != "by_strategy"}
        elif path.is_file():
            summary["metrics"] = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()
    stages = {}
    for folder in sorted(p for p in args.run_dir.rglob("manifest.json")):
        name = str(folder.parent.relative_to(args.run_dir))
        if "/chunks" in name or name.startswith("hub"):
            continue
        stages[name] = stage_summary(folder.parent)
    write_json(args.json, {"run_dir": str(args.run_dir), "env": env_info(), "stages": stages})
    for name, s in stages.items():
        facts = {k: s["report"][k] for k in SHOWN if k in s["report"]}
        print(f"{name:<16} {s['seconds'] or 0:>8.1f} s  {json.dumps(facts)}")


if __name__ == "__main__":
    main()
