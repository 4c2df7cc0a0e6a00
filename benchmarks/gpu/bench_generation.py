"""Generation throughput on the GPU: flawed-answer sampling (pairs stage) and evaluation (eval stage), the project's
batched generation vs one prompt at a time (the original scripts' approach), and against the decode bound.

Usage (on a CUDA machine; the E2B-architecture model and the sample teach data are built when missing):
    python benchmarks/gpu/bench_generation.py --task sampling --json sampling.json
    python benchmarks/gpu/bench_generation.py --task eval --json eval.json
    python benchmarks/gpu/bench_generation.py --task all --backend hf --batch-size 64

Both modes run in one process on the same loaded model with the stage's own requests (sampling: the flawed-answer
instruction + figure + question + reference solution, temperature 1.0, top_p 0.95; eval: the tutor prompt +
figure + question, greedy) and the same max_new_tokens, through `mathwizard.generation.ModelGenerator`. Tokens are
counted up to each answer's end of turn. The decode bound is what a batch could reach if every decode step only
had to read the weights once from HBM: bandwidth x batch / bytes of the weights a step reads (the language model's
layers and the tied lm_head; the vision and audio towers run once per prompt, the per-layer embeddings are looked
up row by row). The KV cache, which the bound leaves out, adds ~40 KB per token of context per sequence.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from math import nan
from pathlib import Path
from typing import Any

from _common import (
    DEFAULT_WORK,
    card_ceilings,
    datasheet,
    ensure_e2b,
    ensure_teach,
    env_info,
    env_line,
    fmt,
    say,
    write_json,
)

# -----------------------------------------------------------------------------
task = "all"  # sampling | eval | all (one model load for both)
backend = "unsloth"  # the pipeline's GPU backend; hf for transformers alone
batch_size = 32  # prompts per generate call when sampling (the stage default is 16)
eval_batch_size = 16  # the eval stage's default
singles = 4  # prompts answered one at a time for the baseline (each takes max_new_tokens decode steps)
max_new_tokens = 128  # same for both modes (the stages default to 1024; the per-token cost barely depends on it)
repeats = 2  # timed passes of the batched mode; median reported
decode = ""  # batched modes measured; default eager, plus compiled on hf (Unsloth refuses it: resolve_decode)
seed = 42
# -----------------------------------------------------------------------------

SKIPPED_WEIGHTS = ("vision_tower", "audio_tower", "embed_vision", "embed_audio", "embed_tokens_per_layer")


def decode_weight_bytes(model: Any) -> int:
    """Bytes of the weights one decode step reads: the language model's parameters (the tied lm_head/embed_tokens
    matrix once: the head reads all of it), not the towers nor the per-layer embedding tables (row lookups)."""
    seen, total = set(), 0
    for name, param in model.named_parameters():
        if any(part in name for part in SKIPPED_WEIGHTS) or param.data_ptr() in seen:
            continue
        seen.add(param.data_ptr())
        total += param.numel() * param.element_size()
    return total


def requests_for(kind: str, teach: Path, n: int) -> list[Any]:
    """`n` requests as the pairs (kind='sampling') or eval stage builds them, cycling over the sample's train split."""
    from mathwizard.config import PairsConfig
    from mathwizard.generation import Request, read_split
    from mathwizard.prompts import load_prompt
    from mathwizard.stages.pairs import _INPUT_COLUMNS, _items, _Sampler

    table = read_split(teach, "train", _INPUT_COLUMNS)
    if kind == "sampling":
        sampler = _Sampler(PairsConfig(), lambda: None)  # type: ignore[arg-type,return-value]
        pool = [sampler.request(item) for item in _items(table, 0, seed)]
    else:
        system = load_prompt("tutor_system")
        pool = [Request(text=r["question"], image=r["image"], system=system) for r in table.to_pylist()]
    return [pool[i % len(pool)] for i in range(n)]


def timed(generator: Any, requests: list[Any], params: Any) -> tuple[float, int]:
    import torch

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    started = time.perf_counter()
    completions = generator(requests, params)
    sync()
    return time.perf_counter() - started, sum(c.tokens for c in completions)


def measure(kind: str, loaded: Any, args: argparse.Namespace, bound: dict[str, float]) -> dict[str, Any]:
    from mathwizard.generation import ModelGenerator, SamplingParams

    batch = args.batch_size if kind == "sampling" else args.eval_batch_size
    temperature, top_p = (1.0, 0.95) if kind == "sampling" else (0.0, 1.0)
    params = SamplingParams(args.max_new_tokens, temperature, top_p, seed)
    requests = requests_for(kind, args.data, batch)
    single = ModelGenerator(model=loaded.model, processor=loaded.processor, batch_size=1, decode="eager")

    warm = time.perf_counter()  # first call: kernels, allocator, the image processor
    single(requests[:1], SamplingParams(8, temperature, top_p, seed))
    one = [timed(single, [r], params) for r in requests[: args.singles]]
    one_rate = sum(t for _, t in one) / sum(s for s, _ in one)
    result: dict[str, Any] = {
        "batch_size": batch,
        "max_new_tokens": args.max_new_tokens,
        "temperature": temperature,
        "single_warmup_s": round(time.perf_counter() - warm - sum(s for s, _ in one), 2),
        "one_at_a_time": {"prompts": len(one), "tokens": sum(t for _, t in one), "seconds": sum(s for s, _ in one)},
        "one_at_a_time_tokens_per_s": one_rate,
        "decode_step_ms_single": 1e3 * sum(s for s, _ in one) / sum(t for _, t in one),
        "modes": {},
    }
    say(f"{kind}: one at a time {one_rate:,.1f} tokens/s ({result['decode_step_ms_single']:.1f} ms a token)")
    for decode in [d.strip() for d in args.decode.split(",") if d.strip()]:
        batched = ModelGenerator(model=loaded.model, processor=loaded.processor, batch_size=batch, decode=decode)
        # The first full pass is the warm-up: compilation (compiled mode) and CUDA-graph capture happen here, with
        # the timed passes' own shapes, so nothing compiles inside the timed passes.
        first_s, _ = timed(batched, requests, params)
        runs = [timed(batched, requests, params) for _ in range(args.repeats)]
        rate = statistics.median(t / s for s, t in runs)
        step_s = statistics.median(s / args.max_new_tokens for s, _ in runs)  # every row decodes max_new_tokens steps
        mode: dict[str, Any] = {
            "warmup_pass_s": round(first_s, 2),
            "warmup_minus_steady_s": round(first_s - statistics.median(s for s, _ in runs), 2),
            "batched": [{"tokens": t, "seconds": s} for s, t in runs],
            "batched_tokens_per_s": rate,
            "speedup_vs_one_at_a_time": rate / one_rate,
            "decode_step_ms": 1e3 * step_s,
        }
        for name, bandwidth in (("measured", bound["copy_bytes_s"]), ("datasheet", bound["datasheet_hbm_bytes_s"])):
            limit = bandwidth * batch / bound["weight_bytes"]
            mode[f"decode_bound_tokens_per_s_{name}"] = limit
            mode[f"fraction_of_bound_{name}"] = rate / limit
        result["modes"][decode] = mode
        say(
            f"{kind} {decode} (batch {batch}): {rate:,.0f} tokens/s vs {one_rate:,.1f} one at a time -> "
            f"{mode['speedup_vs_one_at_a_time']:.1f}x; {fmt(mode['fraction_of_bound_measured'], '.1%')} of the "
            f"decode bound ({mode['decode_bound_tokens_per_s_measured']:,.0f} tokens/s at the measured bandwidth; "
            f"{fmt(mode['fraction_of_bound_datasheet'], '.1%')} at the datasheet's); step {mode['decode_step_ms']:.1f}"
            f" ms (a whole batched call incl. prefill / max_new_tokens); first pass {first_s:.1f} s"
        )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default=task, choices=["sampling", "eval", "all"])
    parser.add_argument("--model", type=Path, default=DEFAULT_WORK / "e2b", help="Model folder (built if missing).")
    parser.add_argument("--data", type=Path, default=None, help="Teach folder (default: built from the sample).")
    parser.add_argument("--backend", default=backend, choices=["hf", "unsloth", "auto"])
    parser.add_argument("--compile", default=None, help="model.compile for the unsloth backend (default: settings').")
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--eval-batch-size", type=int, default=eval_batch_size)
    parser.add_argument("--singles", type=int, default=singles)
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument(
        "--decode", default=decode, help="Batched modes: eager, compiled (comma list; default eager, + compiled on hf)."
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    args.decode = args.decode or ("eager,compiled" if args.backend == "hf" else "eager")

    started = time.perf_counter()
    from mathwizard.models import backend as backends

    if args.compile:
        backends.configure_compile(args.compile)
    backends.activate(backends.resolve_backend(args.backend))  # Unsloth first, as the stages do
    import_s = time.perf_counter() - started
    import torch

    from mathwizard.generation import load_generator

    args.model = ensure_e2b(args.model)
    args.data = ensure_teach(args.data or DEFAULT_WORK / "data" / "02-teach")
    info = env_info()
    ceilings = card_ceilings() if torch.cuda.is_available() else {"matmul_bf16_flops": nan, "copy_bytes_s": nan}
    peaks = datasheet(info.get("gpu", ""))
    say(env_line(info))
    loading = time.perf_counter()
    loaded = load_generator(str(args.model), backend=args.backend, dtype="auto", batch_size=args.batch_size)
    load_s = time.perf_counter() - loading
    weight_bytes = decode_weight_bytes(loaded.model)
    bound = {**ceilings, "datasheet_hbm_bytes_s": peaks["hbm_bytes_s"], "weight_bytes": weight_bytes}
    say(
        f"loaded {args.model} on {args.backend} in {load_s:.0f} s (import {import_s:.0f} s); a decode step reads "
        f"{weight_bytes / 1e9:.2f} GB of weights; copy bandwidth {ceilings['copy_bytes_s'] / 1e12:.2f} TB/s measured, "
        f"{peaks['hbm_bytes_s'] / 1e12:.2f} datasheet"
    )
    report: dict[str, Any] = {
        "benchmark": "generation throughput",
        "command": "python benchmarks/gpu/bench_generation.py " + " ".join(sys.argv[1:]),
        "env": info,
        "card": {**ceilings, **{f"datasheet_{k}": v for k, v in peaks.items()}},
        "settings": {k: str(v) for k, v in vars(args).items()},
        "load_s": round(load_s, 1),
        "import_s": round(import_s, 1),
        "weight_bytes": weight_bytes,
    }
    kinds = ["sampling", "eval"] if args.task == "all" else [args.task]
    for kind in kinds:
        report[kind] = measure(kind, loaded, args, bound)
        write_json(args.json, report)
    say(env_line(info))
    os._exit(0)  # skip the slow teardown of compiled graphs and CUDA state


if __name__ == "__main__":
    main()
