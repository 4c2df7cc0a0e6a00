"""What the teacher stage pays online vs through the Batch API, and after a kill -9 and a resume in each mode.

Usage: `.venv/bin/python benchmarks/bench_teacher_batch.py [--items 1200] [--json out.json]`

Against `mathwizard.testing`'s server in a subprocess (its `billed` counters: requests answered 200 and their
tokens, by mode; a download is never billed), the whole stage (`teach.run`) over `--items` distinct items, each
scenario with a fresh cache:
  1. online: latency 0.05 s per reply, concurrency 16
  2. batch: one batch, 100 requests answered per status check
  3. online, killed: a child process runs scenario 1 and gets `kill -9` once the server has received half the
     requests; then the stage is re-run here to the end
  4. batch, killed: a child process runs scenario 2 and gets `kill -9` while polling (after 5 status checks); then
     the stage is re-run here to the end
The figure that matters: requests billed per item (1.00 = nothing paid twice), and uploads / batches created.
Cost at `--price-in` / `--price-out` USD per million tokens (gpt-4o-mini's list prices by default), batch at
`--batch-discount` off.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_teacher_throughput import make_prepared

# ------------------------------------------------------------------------------------------------ values
ITEMS = 1200
LATENCY_S = 0.05  # online: per reply, so that a kill finds requests in flight
CONCURRENCY = 16
BATCH_CHUNK = 100  # batch: requests answered per status check (12 checks for 1,200 items)
PRICE_IN, PRICE_OUT = 0.15, 0.60  # USD per million tokens, online (gpt-4o-mini's list prices)
KEY = "sk-bench-not-a-real-key"
CHILD = """
import sys
from pathlib import Path
from mathwizard.config import TeacherConfig
from mathwizard.stages import teach
cfg = TeacherConfig.model_validate_json(sys.argv[1])
teach.run(cfg, Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]))
"""
# ---------------------------------------------------------------------------------------------------------


def teacher_config(base_url: str, mode: str, items: int, args: argparse.Namespace):
    from mathwizard.config import TeacherConfig

    return TeacherConfig(
        kind="openai", base_url=base_url, model="bench-teacher", split="train", limit=items, mode=mode,
        concurrency=CONCURRENCY, rpm=None, batch_poll_s=0.02, batch_poll_max_s=0.05, batch_wait_s=None,
        price_input_per_mtok=args.price_in, price_output_per_mtok=args.price_out, batch_discount=args.batch_discount,
    )  # fmt: skip


def killed(server: Any, cfg: Any, data: Path, work: Path, reached: Any) -> tuple[Path, Path]:
    """Run the stage in a child process, `kill -9` it once `reached(server)`, and return (out, cache_dir)."""
    out, cache_dir = work / "out", work / "cache"
    child = subprocess.Popen([sys.executable, "-c", CHILD, cfg.model_dump_json(), str(data), str(out), str(cache_dir)])
    try:
        deadline = time.monotonic() + 300
        while not reached(server) and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait()
    if child.returncode != -signal.SIGKILL:
        raise SystemExit(f"the child ended (exit {child.returncode}) before the kill point")
    return out, cache_dir


def scenario(server: Any, run: Any, items: int) -> dict[str, Any]:
    """Run the stage with fresh counters; what the server billed for it."""
    from mathwizard.stages import teach

    server.reset_counts()
    report = teach.Report.of(run())
    billed, calls = server.billed, server.stats()["calls"]
    mode = "batch" if report.mode == "batch" else "online"
    requests = billed.get("online_requests", 0) + billed.get("batch_requests", 0)
    result = {
        "written": report.written, "failed": report.failed, "requests_billed": requests,
        "per_item": round(requests / items, 4), "paid_twice": requests - items,
        "prompt_tokens_billed": billed.get(f"{mode}_prompt_tokens", 0),
        "completion_tokens_billed": billed.get(f"{mode}_completion_tokens", 0),
        "uploads": calls.get("files.create", 0), "batches_created": calls.get("batches.create", 0),
        "status_checks": calls.get("batches.retrieve", 0), "chat_completions": calls.get("chat.completions", 0),
    }  # fmt: skip
    return result


def cost(result: dict[str, Any], batch: bool, args: argparse.Namespace) -> float:
    factor = 1 - args.batch_discount if batch else 1.0
    tokens = result["prompt_tokens_billed"] * args.price_in + result["completion_tokens_billed"] * args.price_out
    return factor * tokens / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=ITEMS)
    parser.add_argument("--price-in", type=float, default=PRICE_IN)
    parser.add_argument("--price-out", type=float, default=PRICE_OUT)
    parser.add_argument("--batch-discount", type=float, default=0.5)
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = parser.parse_args()
    os.environ["MATHWIZARD_TEACHER_API_KEY"] = KEY
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from mathwizard.stages import teach
    from mathwizard.testing import spawn_test_server

    n = args.items
    work = Path(tempfile.mkdtemp(prefix="bench-teacher-batch-"))
    data = make_prepared(work / "01-prepare", n)
    results: dict[str, Any] = {"items": n}
    load_before = os.getloadavg()[0]
    with spawn_test_server(latency=LATENCY_S, api_key=KEY, batch_chunk=BATCH_CHUNK) as server:
        for mode in ("online", "batch"):
            cfg = teacher_config(server.base_url, mode, n, args)
            folder = work / mode
            results[mode] = scenario(server, lambda cfg=cfg, f=folder: teach.run(cfg, data, f / "out", f / "cache"), n)
        # ------------------------------------------------------------------------------ kill -9, resume
        for mode, reached, where in (
            ("online", lambda s: s.requests >= n // 2, f"after {n // 2:,} requests"),
            ("batch", lambda s: s.stats()["calls"].get("batches.retrieve", 0) >= 5, "while polling (5 checks)"),
        ):
            cfg = teacher_config(server.base_url, mode, n, args)
            server.reset_counts()
            out, cache_dir = killed(server, cfg, data, work / f"{mode}-killed", reached)
            before = server.billed
            before_requests = before.get("online_requests", 0) + before.get("batch_requests", 0)
            calls_before = server.stats()["calls"]

            def resume(cfg=cfg, out=out, cache_dir=cache_dir) -> Any:
                return teach.run(cfg, data, out, cache_dir)

            # scenario() resets the counters: add what the killed child had been billed
            result = scenario(server, resume, n)
            result["killed"] = where
            result["billed_before_kill"] = before_requests
            result["requests_billed"] += before_requests
            result["paid_twice"] = result["requests_billed"] - n
            result["per_item"] = round(result["requests_billed"] / n, 4)
            for name in ("prompt_tokens", "completion_tokens"):
                result[f"{name}_billed"] += before.get(f"{mode}_{name}", 0)
            result["uploads"] += calls_before.get("files.create", 0)
            result["batches_created"] += calls_before.get("batches.create", 0)
            results[f"{mode}_killed"] = result

    # -------------------------------------------------------------------------------------- print
    for name in ("online", "batch", "online_killed", "batch_killed"):
        r = results[name]
        batch = name.startswith("batch")
        r["cost_usd"] = round(cost(r, batch, args), 6)
        label = f"{name.split('_')[0]}, killed {r['killed']} then resumed" if "killed" in r else name
        extra = f"; {r['uploads']} upload, {r['batches_created']} batch" if batch else ""
        print(
            f"{label}: {r['written']:,} of {n:,} written; "
            f"{r['requests_billed']:,} requests billed ({r['per_item']:.3f} per item, {r['paid_twice']:+,} paid"
            f" twice){extra}; tokens billed {r['prompt_tokens_billed']:,} prompt"
            f" + {r['completion_tokens_billed']:,} completion; est. ${r['cost_usd']:.4f}",
            flush=True,
        )
    ratio = results["batch"]["cost_usd"] / results["online"]["cost_usd"] if results["online"]["cost_usd"] else 0
    print(f"batch vs online cost: {ratio:.2f}x (same tokens, batch_discount {args.batch_discount:g})")
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    env = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, git {sha}"
    print(f"env: {env}; load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after")
    results.update(cost_ratio=round(ratio, 4), env=env)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
