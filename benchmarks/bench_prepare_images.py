"""Image cleaning: the parallel path (crash-isolating worker processes) against the single-process loop, in one run.

Usage: `.venv/bin/python benchmarks/bench_prepare_images.py [--images 2000] [--workers N] [--json out.json]`

Both sides run the same per-image function (decode safely, RGB, shrink to 512 px, PNG), on the same generated
figures, alternating over several repeats; the median of each is reported and the outputs are checked equal.
On a shared box, a pure-CPU busy loop on 1 vs N processes (before and after) shows how much parallelism the
machine gave at the time, so the speedup can be read against that ceiling.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import PIL
from PIL import Image, ImageDraw

from mathwizard.data.clean import clean_images, clean_images_serial

# ----------------------------------------------------------------------------------------------------------------
IMAGES = 2000  # figures to generate
MAX_SIZE = 512  # longest side after cleaning (the stage's default)
MAX_PIXELS = 64_000_000  # bomb guard (the stage's default)
WORKERS = None  # None: every core, as the stage does
REPEATS = 3  # alternating serial/parallel passes; the median of each is reported
SEED = 0
# ----------------------------------------------------------------------------------------------------------------


def _figure(args: tuple[int, str]) -> None:
    """One MM_Math-like figure: line drawing with labels, varied size and mode (widths 5 px to ~4,000 px)."""
    index, folder = args
    rng = random.Random(SEED * 1_000_003 + index)
    bucket = rng.random()
    if bucket < 0.02:
        width = rng.randint(5, 40)  # MM_Math has figures only a few pixels wide
    elif bucket < 0.70:
        width = rng.randint(150, 700)
    elif bucket < 0.95:
        width = rng.randint(700, 1600)
    else:
        width = rng.randint(1600, 4000)
    height = max(3, int(width * rng.uniform(0.4, 1.3)))
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    line = max(1, width // 250)
    for _ in range(rng.randint(3, 9)):
        points = [(rng.randrange(width), rng.randrange(height)) for _ in range(2)]
        draw.line(points, fill=(0, 0, 0), width=line)
    if width > 60:
        r = rng.randint(width // 8, width // 3)
        cx, cy = rng.randrange(width), rng.randrange(height)
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=(0, 0, 0), width=line)
        for label in "ABCDO"[: rng.randint(2, 5)]:
            draw.text((rng.randrange(width - 10), rng.randrange(max(1, height - 10))), label, fill=(20, 20, 200))
    kind = rng.random()
    path = Path(folder) / f"{index:05d}"
    if kind < 0.55:
        img.convert("L").save(path.with_suffix(".png"))
    elif kind < 0.75:
        img.save(path.with_suffix(".png"))
    elif kind < 0.85:
        img.convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(path.with_suffix(".png"))
    elif kind < 0.90:
        img.convert("RGBA").save(path.with_suffix(".png"))
    else:
        img.save(path.with_suffix(".jpg"), quality=90)


def _burn(n: int) -> int:
    total = 0
    for i in range(n):
        total += i * i
    return total


def machine_ceiling(workers: int, n: int = 4_000_000) -> float:
    """How much faster `workers` processes of pure CPU run than one, right now: the most any parallel path can get.

    On a box shared with other jobs this is well below `workers`; reading the speedup against it separates the
    code's overhead from the machine's load.
    """
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_burn, [1] * workers))  # start the workers before the clock
        t0 = time.perf_counter()
        list(pool.map(_burn, [n] * workers * 2))
        parallel = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(workers * 2):
        _burn(n)
    return (time.perf_counter() - t0) / parallel


def _git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=IMAGES)
    parser.add_argument("--max-size", type=int, default=MAX_SIZE)
    parser.add_argument("--workers", type=int, default=WORKERS)
    parser.add_argument("--repeats", type=int, default=REPEATS)
    parser.add_argument("--json", type=Path, default=None, help="Also write the numbers here.")
    args = parser.parse_args()
    workers = args.workers or os.cpu_count() or 1

    with tempfile.TemporaryDirectory(prefix="bench-prepare-") as folder:
        started = time.perf_counter()
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_figure, [(i, folder) for i in range(args.images)], chunksize=32))
        paths = sorted(str(p) for p in Path(folder).iterdir())
        megapixels = sum(w * h for w, h in (Image.open(p).size for p in paths)) / 1e6
        print(
            f"generated {len(paths):,} figures ({megapixels:,.0f} MP, "
            f"{sum(os.path.getsize(p) for p in paths) / 1e6:,.1f} MB) in {time.perf_counter() - started:.1f} s"
        )
        for p in paths:  # warm the page cache so neither side pays for the first read
            Path(p).read_bytes()

        load_before = os.getloadavg()
        ceilings = [machine_ceiling(workers)]
        serial_s, parallel_s = [], []
        reference: list[bytes | None] | None = None
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            baseline = clean_images_serial(paths, args.max_size, MAX_PIXELS)
            serial_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            candidate = list(clean_images(paths, args.max_size, MAX_PIXELS, workers=workers))
            parallel_s.append(time.perf_counter() - t0)
            reference = reference or [r.png for r in baseline]
            if [r.png for r in candidate] != reference:
                sys.exit("parallel output differs from the single-process output")
        ceilings.append(machine_ceiling(workers))
        load_after = os.getloadavg()

    serial_rate = len(paths) / statistics.median(serial_s)
    parallel_rate = len(paths) / statistics.median(parallel_s)
    speedup = parallel_rate / serial_rate
    ceiling = statistics.mean(ceilings)
    print(f"clean images: {parallel_rate:,.1f} img/s vs {serial_rate:,.1f} img/s baseline -> {speedup:.2f}x")
    print(
        f"machine: {workers} busy-loop processes ran {ceiling:.2f}x faster than one (before {ceilings[0]:.2f}x, "
        f"after {ceilings[1]:.2f}x) -> the parallel path reached {speedup / ceiling:.0%} of what the box gave"
    )
    env = {
        "python": platform.python_version(),
        "pillow": PIL.__version__,
        "cpus": os.cpu_count(),
        "workers": workers,
        "cpu": platform.processor() or platform.machine(),
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in load_after],
        "git": _git_sha(),
    }
    print("env: " + ", ".join(f"{k}={v}" for k, v in env.items()))
    if args.json:
        result = {
            "images": len(paths),
            "megapixels": round(megapixels, 1),
            "max_size": args.max_size,
            "serial_s": [round(s, 3) for s in serial_s],
            "parallel_s": [round(s, 3) for s in parallel_s],
            "serial_img_per_s": round(serial_rate, 2),
            "parallel_img_per_s": round(parallel_rate, 2),
            "speedup": round(speedup, 3),
            "machine_ceiling": [round(c, 3) for c in ceilings],
            "env": env,
        }
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
