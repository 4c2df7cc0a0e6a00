"""Flawed-answer sampling: batched `generate`, and the row engine, vs one prompt at a time (the original script).

Usage:
    .venv/bin/python benchmarks/bench_pairs_sampling.py                      # tiny model, CPU
    python benchmarks/bench_pairs_sampling.py --model <run>/03-sft --device cuda --n 64 --batch-size 32 \\
        --max-new-tokens 1024 --json bench.json                          # the real SFT model on a GPU

Modes: `one_at_a_time` (one prompt per `generate` call, the baseline), `batched` (`batch_size` left-padded prompts
per `generate` call: `model.decode: eager`) and `rows` (`mathwizard.decoding`'s row engine with `batch_size` rows:
`model.decode: graphs`, which `auto` picks; CUDA graphs on a GPU only). All run in one process on the same model,
prompts (the pairs stage's real prompts: flawed-answer instruction + figure + question + reference solution) and
sampling settings (temperature 1.0, top_p 0.95, the same max_new_tokens). Throughput counts generated tokens up to
each answer's end-of-turn, so the compute a batch spends on rows that already finished counts against batching, as
it does in the stage.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import subprocess
import time
from pathlib import Path

# -----------------------------------------------------------------------------
model_name = "tiny"  # 'tiny', a model dir, a stage folder (03-sft) or a Hub id
device = "cpu"  # cpu | cuda
n_prompts = 16  # prompts per pass
batch_size = 8  # prompts per generate call in the batched mode
max_new_tokens = 64  # the stage's default is 1024 (the original's)
repeats = 3  # timed passes per mode; the median is reported
threads = 1  # torch CPU threads (one is fastest for the tiny model on a busy 2-core box)
seed = 42
# -----------------------------------------------------------------------------


def _figure(i: int) -> bytes:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (320, 240), "white")
    ImageDraw.Draw(image).polygon([(20 + i, 220), (300, 220), (160 - i, 20)], outline="black", width=3)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def build_requests(n: int) -> list:
    """The pairs stage's own requests for n problems whose question lengths vary, as MM_Math's do."""
    from mathwizard.flaws import FLAWED_STRATEGIES
    from mathwizard.generation import Request
    from mathwizard.prompts import load_prompt
    from mathwizard.stages.pairs import user_prompt

    requests = []
    for i in range(n):
        b = 40 + i % 30
        question = (
            f"In triangle ABC, AB = AC and angle B = {b} degrees. " + "D lies on BC. " * (i % 7) + "Find angle A."
        )
        chosen = (
            f"### Solution\n1. Since AB = AC, angle B = angle C = {b} degrees.\n"
            f"2. The angles of a triangle sum to 180 degrees.\n3. So angle A = 180 - 2 x {b} = {180 - 2 * b}.\n"
            f"### Final Answer\n\\boxed{{{180 - 2 * b}}}"
        )
        strategy = FLAWED_STRATEGIES[i % len(FLAWED_STRATEGIES)]
        requests.append(
            Request(
                text=user_prompt(question, chosen),
                image=_figure(i),
                system=load_prompt(f"flawed_{strategy}"),
            )
        )
    return requests


def timed_pass(generator, requests, params, sync) -> tuple[float, int]:
    sync()
    started = time.perf_counter()
    completions = generator(requests, params)
    sync()
    return time.perf_counter() - started, sum(c.tokens for c in completions)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=model_name)
    parser.add_argument("--device", default=device, choices=["cpu", "cuda"])
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--n", type=int, default=n_prompts)
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--threads", type=int, default=threads)
    parser.add_argument("--modes", default="batched,rows,one_at_a_time", help="Comma-separated, timed in this order.")
    parser.add_argument("--json", type=Path, default=None, help="Also write the numbers to this file.")
    args = parser.parse_args()

    import torch
    import transformers

    from mathwizard.generation import ModelGenerator, SamplingParams, load_generator

    torch.set_num_threads(args.threads)
    loaded = load_generator(args.model, backend=args.backend, batch_size=args.batch_size)
    model, processor = loaded.model, loaded.processor
    if model.device.type != args.device:
        model.to(args.device)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    requests = build_requests(args.n)
    generators = {
        "batched": ModelGenerator(model=model, processor=processor, batch_size=args.batch_size),
        "rows": ModelGenerator(model=model, processor=processor, batch_size=args.batch_size, decode="graphs"),
        "one_at_a_time": ModelGenerator(model=model, processor=processor, batch_size=1),
    }
    generators = {name: generators[name] for name in args.modes.split(",")}

    # Warm-up: kernels, allocator, the image processor's first call, every figure through the vision tower.
    for generator in generators.values():
        generator(requests, SamplingParams(8, 1.0, 0.95, seed))

    results: dict[str, dict[str, float]] = {}
    for name, generator in generators.items():
        runs = [
            timed_pass(generator, requests, SamplingParams(args.max_new_tokens, 1.0, 0.95, seed + r), sync)
            for r in range(args.repeats)
        ]
        rates = [tokens / seconds for seconds, tokens in runs]
        results[name] = {
            "seconds_median": statistics.median(s for s, _ in runs),
            "seconds_min": min(s for s, _ in runs),
            "seconds_max": max(s for s, _ in runs),
            "tokens_median": statistics.median(t for _, t in runs),
            "tokens_per_s_median": statistics.median(rates),
        }
    for name, r in results.items():
        print(
            f"{name:>14}: {r['tokens_per_s_median']:8.1f} tokens/s ({r['tokens_median']:.0f} tokens in"
            f" {r['seconds_median']:.2f} s, median of {args.repeats}; {r['seconds_min']:.2f}-{r['seconds_max']:.2f} s)"
        )
    ratios = {
        f"{a}/{b}": results[a]["tokens_per_s_median"] / results[b]["tokens_per_s_median"]
        for a, b in (("batched", "one_at_a_time"), ("rows", "one_at_a_time"), ("rows", "batched"))
        if a in results and b in results
    }
    for pair, ratio in ratios.items():
        a, b = pair.split("/")
        print(f"pairs sampling: {a} (batch {args.batch_size}) {ratio:.2f}x the {b.replace('_', '-')} throughput")
    env = {
        "device": torch.cuda.get_device_name(0) if args.device == "cuda" else f"cpu ({args.threads} thread(s))",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "git": _git_sha(),
    }
    settings = {
        "model": args.model,
        "n": args.n,
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "repeats": args.repeats,
        "threads": args.threads,
    }
    print("env: " + " · ".join(f"{k} {v}" for k, v in env.items()))
    if args.json:
        args.json.write_text(
            json.dumps({"settings": settings, "results": results, "ratios": ratios, "env": env}, indent=2)
        )


def _git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"


if __name__ == "__main__":
    main()
