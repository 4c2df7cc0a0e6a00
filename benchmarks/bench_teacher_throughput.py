"""Teacher throughput against an OpenAI-compatible server with latency and injected faults, and the cached re-run.

Usage: `.venv/bin/python benchmarks/bench_teacher_throughput.py [--items 1200] [--json out.json]`

Scenarios, all against `mathwizard.testing`'s server in a subprocess (so it does not share this process's GIL):
  1. concurrency-bound: latency 0.2 s, concurrency 16, rpm 6,000 -> limit min(16 / 0.2, 6000 / 60) = 80 items/s
  2. rpm-bound:         latency 0.2 s, concurrency 64, rpm 3,000 -> limit min(64 / 0.2, 3000 / 60) = 50 items/s
  3. baseline: the original approach, a sequential loop of `openai.OpenAI().chat.completions.create` (its default
     retries; an error becomes the text "Error: API call failed..."), same server, same faults
  4. cached re-run: the whole stage (`teach.run`) over 6,000 items whose replies are all cached (goal <= 5 s)
Faults: 10 % of requests (2 % each: 429 with Retry-After 1 s, 500, 503, dropped connection, wrong answer).
The throughput figure is the whole stage (`teach.run`: read, key, ask, validate, store, write) over all items;
goal >= 0.9 x the limit. A fault costs a retry (transport) or a second full-latency ask (wrong answer), so with
10 % faults the rpm-bound ceiling itself is about 1 / 1.1 = 0.91 x the limit: every retry spends an RPM token.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

# ------------------------------------------------------------------------------------------------ values
ITEMS = 1200  # items per throughput scenario
LATENCY_S = 0.2
FAULT_RATE = 0.10
FAULTS = ("429", "500", "503", "drop", "wrong_answer")  # equal shares of FAULT_RATE
SCENARIOS = {"concurrency-bound": (16, 6000), "rpm-bound": (64, 3000)}  # name -> (concurrency, rpm)
SEQUENTIAL_ITEMS = 50  # the baseline is slow: 50 x 0.2 s ~ 10 s
CACHED_ITEMS = 6000
KEY = "sk-bench-not-a-real-key"
# ---------------------------------------------------------------------------------------------------------


def make_prepared(folder: Path, n: int) -> Path:
    """A prepare-stage folder with `n` distinct train items (the 60 bundled problems, each question numbered)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mathwizard.data.fetch import SAMPLE_DIR
    from mathwizard.data.splits import SPLIT_FILES, arrow_schema
    from mathwizard.manifest import stage_output

    records = [json.loads(line) for line in (SAMPLE_DIR / "mm_math_sample.jsonl").read_text().splitlines()]
    images = {r["file_name"]: (SAMPLE_DIR / "images" / r["file_name"]).read_bytes() for r in records}
    schema = arrow_schema()
    rows = []
    for i in range(n):
        r = records[i % len(records)]
        rows.append(
            {
                "id": f"bench{i:06d}",
                "question": f"{r['question']} (variant {i // len(records)})",
                "solution": r["solution"],
                "image": {"bytes": images[r["file_name"]], "path": None},
                "difficult": r.get("difficult", ""),
                "year": r.get("year", ""),
                "knowledge": r.get("knowledge", ""),
                "file_name": r["file_name"],
            }
        )
    with stage_output(folder, stage="prepare", version=0, fingerprint=f"bench-{n}") as record:
        for split, name in SPLIT_FILES.items():
            table = pa.Table.from_pylist(rows if split == "train" else [], schema=schema)
            pq.write_table(table, folder / name)
            record.add_file(name, rows=table.num_rows)
    return folder


def teacher_config(base_url: str, **overrides):
    from mathwizard.config import TeacherConfig

    values = {"kind": "openai", "base_url": base_url, "model": "bench-teacher", "split": "train"}
    return TeacherConfig(**{**values, **overrides})


def fill(cfg, data: Path, cache_dir: Path, n: int) -> tuple[float, float, dict]:
    """Seconds and steady items/s of the teach stage over the first `n` train items (an empty cache), and its report.

    Steady rate: items finished between the 10 % and 90 % marks over the time between them, i.e. without the
    start (the first request goes alone) and the tail (the last items waiting out a Retry-After).
    """
    from mathwizard.stages import teach

    stamps: list[float] = []

    def progress(done: int, total: int) -> None:
        stamps.extend([time.perf_counter()] * (done - len(stamps)))

    out = cache_dir.with_name(f"{cache_dir.name}-out")
    cfg = cfg.model_copy(update={"limit": n, "max_failed_fraction": 1.0})  # count failures, don't stop on them
    started = time.perf_counter()
    manifest = teach.run(cfg, data, out, cache_dir, progress=progress)
    seconds = time.perf_counter() - started
    lo, hi = int(0.1 * len(stamps)), int(0.9 * len(stamps)) - 1
    steady = (hi - lo) / (stamps[hi] - stamps[lo]) if hi > lo and stamps[hi] > stamps[lo] else float("nan")
    return seconds, steady, teach.Report.of(manifest).model_dump(exclude={"splits", "failures_by_reason"})


def sequential_baseline(base_url: str, data: Path, n: int) -> tuple[float, int, int]:
    """The original script's loop: one request after another; an error is written as the solution text.

    Returns seconds, errors written as data, and replies written although they fail our validation.
    """
    import openai
    import pyarrow.parquet as pq

    from mathwizard.answers import final_answer
    from mathwizard.prompts import load_prompt
    from mathwizard.teacher.validate import reply_problems

    client = openai.OpenAI(api_key=KEY, base_url=base_url)  # default: 2 retries of its own
    table = pq.read_table(data / "train-00000-of-00001.parquet", columns=["question", "solution"]).slice(0, n)
    system, user = load_prompt("rewrite_system"), load_prompt("rewrite_user")
    errors = invalid = 0
    started = time.perf_counter()
    for question, solution in zip(*table.to_pydict().values(), strict=True):
        prompt = user.replace("{question}", question).replace("{solution}", solution).replace("{answer}", "")
        try:
            reply = client.chat.completions.create(
                model="bench-teacher",
                messages=[{"role": "system", "content": system}, {"role": "user", "content": prompt}],
                temperature=0,
            )
            text = reply.choices[0].message.content or ""
        except Exception as exc:  # the original wrote "Error: API call failed..." into the dataset
            text = f"Error: API call failed: {exc}"
            errors += 1
        invalid += bool(reply_problems(text, final_answer(solution)))
    return time.perf_counter() - started, errors, invalid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=ITEMS)
    parser.add_argument("--latency", type=float, default=LATENCY_S)
    parser.add_argument("--fault-rate", type=float, default=FAULT_RATE)
    parser.add_argument("--sequential-items", type=int, default=SEQUENTIAL_ITEMS)
    parser.add_argument("--cached-items", type=int, default=CACHED_ITEMS)
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = parser.parse_args()
    os.environ["MATHWIZARD_TEACHER_API_KEY"] = KEY
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from mathwizard.stages import teach
    from mathwizard.teacher.cache import ReplyCache
    from mathwizard.testing import spawn_test_server

    faults = {name: args.fault_rate / len(FAULTS) for name in FAULTS}
    work = Path(tempfile.mkdtemp(prefix="bench-teacher-"))
    results: dict = {"items": args.items, "latency_s": args.latency, "fault_rate": args.fault_rate}
    load_before = os.getloadavg()[0]
    try:
        data = make_prepared(work / "01-prepare", max(args.items, args.cached_items, args.sequential_items))
        with spawn_test_server(latency=args.latency, faults=faults, retry_after=1.0, api_key=KEY) as server:
            # ---------------------------------------------------------------------- concurrent scenarios
            for name, (concurrency, rpm) in SCENARIOS.items():
                limit = min(concurrency / args.latency, rpm / 60)
                server.reset_counts()
                cfg = teacher_config(server.base_url, concurrency=concurrency, rpm=rpm)
                seconds, steady, result = fill(cfg, data, work / f"cache-{name}", args.items)
                rate = args.items / seconds
                requests = server.requests
                results[name] = {
                    "concurrency": concurrency, "rpm": rpm, "limit_items_s": limit, "seconds": round(seconds, 2),
                    "items_s": round(rate, 2), "ratio": round(rate / limit, 3), "steady_items_s": round(steady, 2),
                    "steady_ratio": round(steady / limit, 3), "requests": requests,
                    "requests_s": round(requests / seconds, 2), "outcomes": server.outcomes, **result,
                }  # fmt: skip
                print(
                    f"{name}: {rate:.1f} items/s vs limit {limit:.0f} (min({concurrency}/{args.latency:g} s, "
                    f"{rpm}/60)) -> {rate / limit:.2f}x (steady 10-90 %: {steady:.1f}/s = {steady / limit:.2f}x); "
                    f"{requests} requests ({requests / seconds:.1f}/s), {result['retries']} retries, "
                    f"{result['failed']} failed, {seconds:.1f} s",
                    flush=True,
                )
            # ------------------------------------------------------------------------ sequential baseline
            server.reset_counts()
            seq_seconds, errors, invalid = sequential_baseline(server.base_url, data, args.sequential_items)
            seq_rate = args.sequential_items / seq_seconds
            best = max(results[name]["items_s"] for name in SCENARIOS)
            results["sequential"] = {
                "items": args.sequential_items, "seconds": round(seq_seconds, 2), "items_s": round(seq_rate, 2),
                "errors_written_as_data": errors, "invalid_written_as_data": invalid, "outcomes": server.outcomes,
            }  # fmt: skip
            print(
                f"sequential loop (original): {seq_rate:.2f} items/s over {args.sequential_items} items, "
                f"{invalid} invalid replies written as data ({errors} of them errors) -> concurrent runner "
                f"{best / seq_rate:.1f}x faster, and it writes none",
                flush=True,
            )
        # ---------------------------------------------------------------------------- cached re-run
        with spawn_test_server(latency=0.0, api_key=KEY) as server:
            cfg = teacher_config(server.base_url, concurrency=64, rpm=None)
            cache_dir = work / "cache-6000"
            fill_seconds, _, fill_result = fill(cfg, data, cache_dir, args.cached_items)
            print(
                f"cache fill (no latency, no faults, concurrency 64): {args.cached_items} items in "
                f"{fill_seconds:.1f} s = {args.cached_items / fill_seconds:.0f} items/s (client + server overhead)",
                flush=True,
            )
            with ReplyCache.in_dir(cache_dir) as cache:
                assert len(cache) == args.cached_items, len(cache)
            sent = server.requests
            runs = []
            for _ in range(3):
                out = work / "02-teach"
                shutil.rmtree(out, ignore_errors=True)
                started = time.perf_counter()
                manifest = teach.run(cfg.model_copy(update={"limit": args.cached_items}), data, out, cache_dir)
                runs.append(time.perf_counter() - started)
                report = teach.Report.of(manifest)
                assert report.written == args.cached_items and report.api_calls == 0
            assert server.requests == sent  # not one request
            cached_s = statistics.median(runs)
            results["cached"] = {
                "items": args.cached_items, "fill_seconds": round(fill_seconds, 2), "fill": fill_result,
                "rerun_seconds": [round(r, 2) for r in runs], "median_s": round(cached_s, 2),
            }  # fmt: skip
            print(
                f"cached re-run of the whole stage: {args.cached_items} items in {cached_s:.2f} s (median of 3: "
                f"{', '.join(f'{r:.2f}' for r in runs)}), 0 requests",
                flush=True,
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["env"] = env_line(load_before)
    print("env:", json.dumps(results["env"]))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


def env_line(load_before: float) -> dict:
    import openai

    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "python": platform.python_version(),
        "openai": openai.__version__,
        "git": sha,
        "load_1min_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }


if __name__ == "__main__":
    main()
