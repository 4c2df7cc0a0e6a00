"""Prefect's share of the teacher stage's time: the teach flow on a real Prefect server vs the library call alone.

Usage: `.venv/bin/python benchmarks/bench_prefect_overhead.py [--items 6000] [--repeats 2] [--json out.json]`

Both run in this process, alternating (library, flow, library, flow, ...), each with a fresh reply cache, against
`mathwizard.testing`'s OpenAI-compatible server in a subprocess (latency 0.2 s, no faults) and a real
`prefect server start` on 127.0.0.1 (SQLite) started here. The flow is `flows/teach.py:teach_flow` (one task, a
progress artifact, a table artifact); the library call is `mathwizard.stages.teach.run` on the
same data. Overhead = (flow - library) / flow, medians over the repeats; goal <= 5 %.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# ------------------------------------------------------------------------------------------------ values
ITEMS = 6000
REPEATS = 2
LATENCY_S = 0.2  # per reply; real APIs take seconds, which would only shrink Prefect's share
CONCURRENCY = 64  # limit: 64 / 0.2 s = 320 items/s, above what the client reaches on 2 cores
KEY = "sk-bench-not-a-real-key"
# ---------------------------------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=ITEMS)
    parser.add_argument("--repeats", type=int, default=REPEATS)
    parser.add_argument("--latency", type=float, default=LATENCY_S)
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-prefect-"))
    os.environ.update(
        PREFECT_HOME=str(work / "prefect"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
        MATHWIZARD_TEACHER_API_KEY=KEY,
        PREFECT_LOCAL_STORAGE_PATH=str(work / "results"),
    )
    from deployments.localstack import LocalStack

    stack = LocalStack(home=work / "prefect")
    try:
        stack.start_server()
        os.environ["PREFECT_API_URL"] = stack.api_url  # before prefect is imported: the real server, not ephemeral
        result = measure(args, work)
    finally:
        stack.stop()
        shutil.rmtree(work, ignore_errors=True)
    report(args, result)


def measure(args: argparse.Namespace, work: Path) -> dict:
    # The teacher benchmark's generator: the 60 bundled problems, each question numbered so every item is distinct.
    from bench_teacher_throughput import make_prepared

    from flows.teach import teach_flow
    from mathwizard.config import TeacherConfig, load_settings
    from mathwizard.stages import teach
    from mathwizard.testing.openai_server import spawn_test_server

    data = make_prepared(work / "01-prepare", args.items)
    library, flow, checks = [], [], []
    with spawn_test_server(latency=args.latency) as server:
        teacher = TeacherConfig(
            kind="openai",
            base_url=server.base_url,
            model="bench-teacher",
            split="train",
            concurrency=CONCURRENCY,
            rpm=None,  # no rate limit: the benchmark measures Prefect, not the limiter
        )
        settings = load_settings(home=str(work / "home")).model_copy(update={"teacher": teacher})
        for i in range(args.repeats):
            # Library alone: the whole stage in one call, fresh cache.
            server.reset_counts()
            started = time.perf_counter()
            manifest = teach.run(settings.teacher, data, work / f"lib-{i}" / "02-teach", work / f"lib-{i}" / "cache")
            library.append(time.perf_counter() - started)
            checks.append(("library", teach.Report.of(manifest).written, server.requests))

            # The flow on the real server: the task, artifacts, state reports; fresh cache under its own home.
            server.reset_counts()
            run_settings = settings.model_copy(update={"home": str(work / f"flow-{i}")})
            started = time.perf_counter()
            result = teach_flow(settings=run_settings, data=str(data), out=str(work / f"flow-{i}" / "02-teach"))
            flow.append(time.perf_counter() - started)
            checks.append(("flow", teach.Report.of(result).written, server.requests))
            print(f"repeat {i + 1}: library {library[-1]:.1f} s, flow {flow[-1]:.1f} s", flush=True)
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()  # send the flow's last logs while the server is still up
    for name, written, requests in checks:
        if written != args.items or requests != args.items:
            raise SystemExit(f"{name}: {written} written, {requests} requests; expected {args.items} of each")
    return {"library_s": library, "flow_s": flow}


def report(args: argparse.Namespace, result: dict) -> None:
    lib, flow = statistics.median(result["library_s"]), statistics.median(result["flow_s"])
    share = (flow - lib) / flow
    verdict = "meets" if share <= 0.05 else "misses"
    print(
        f"teach {args.items:,} items: flow {flow:.1f} s vs library {lib:.1f} s -> Prefect overhead "
        f"{100 * share:.1f} % ({verdict} the <= 5 % goal)"
    )
    env = env_line()
    print(env)
    if args.json:
        numbers = {"items": args.items, "latency_s": args.latency, "concurrency": CONCURRENCY}
        numbers |= result | {"library_median_s": lib, "flow_median_s": flow, "overhead": share, "env": env}
        args.json.write_text(json.dumps(numbers, indent=2) + "\n")


def env_line() -> str:
    from importlib import metadata

    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout
    except OSError:
        sha = "?"
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"env: {platform.machine()} {os.cpu_count()} cores, python {platform.python_version()}, "
        f"prefect {metadata.version('prefect')}, openai {metadata.version('openai')}, git {sha.strip()}, load {load}"
    )


if __name__ == "__main__":
    main()
