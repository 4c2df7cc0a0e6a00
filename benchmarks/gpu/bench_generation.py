"""Generation throughput on the GPU: flawed-answer sampling (pairs stage) and evaluation (eval stage), the row engine
(`model.decode: graphs`, mathwizard/decoding.py) vs transformers' generate in batches (`eager`, the old default).

Usage (on a CUDA machine; the E2B-architecture model and the sample's stage folders are made when missing):
    python benchmarks/gpu/bench_generation.py --json generation.json
    python benchmarks/gpu/bench_generation.py --task sampling --prompts 256 --max-new-tokens 1024
    python benchmarks/gpu/bench_generation.py --model tiny --prompts 8 --max-new-tokens 16 --baseline-new-tokens 8
    python benchmarks/gpu/bench_generation.py --task sampling --prompts 1024 --figures both

`--figures both` runs the candidate twice: every figure through the vision tower in the call (a stage in a process of
its own), then with every figure's tower output computed before it (`vision_cache` after SFT in a one-GPU pipeline,
where the pairs and eval stages find SFT's figures).

The stage's own requests (sampling: the flawed-answer instruction + figure + question + reference solution,
temperature 1.0, top_p 0.95, the checkpoint's top_k; eval: the tutor prompt + figure + question, greedy), cycling over
the sample's train split. The candidate answers `--prompts` requests (default: as many as the rows the free GPU
memory holds) with up to `--max-new-tokens` each (the stages' 1,024). Its figures: tokens/s over the whole call
(image processing, prefill, every decode step; tokens counted up to each answer's end of turn), the decode step's
median and spread from CUDA events around each graph replay, and that step against the decode bound: the time to
read the weights a step needs once from HBM at the measured copy bandwidth (the language model's layers and the tied
LM head; the towers run once per prompt), and, second, the weights plus the KV cache the engine reads at each step.
The baseline: `generate` on batches of `--baseline-batch` (the stages' old default 16) for `--baseline-new-tokens`
(128, so it ends in seconds; its per-token rate at 1,024 would be lower, so the ratio is on the baseline's side).
A random model never ends an answer early, so every row runs to max_new_tokens and no row is refilled mid-batch.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from _common import (
    DEFAULT_WORK,
    env_line,
    parse_kernels,
    say,
    set_up,
    spread,
    write_json,
)

STARTED = time.perf_counter()
# -----------------------------------------------------------------------------
task = "all"  # sampling | eval | all (one model load for both)
backend = "hf"  # how the model is loaded for generation (the engine needs no Unsloth)
prompts = 0  # candidate requests; 0: the rows the free GPU memory holds (mathwizard.decoding.rows_for)
max_new_tokens = 1024  # the pairs and eval stages' default
baseline_batch = 16  # the stages' old default batch
baseline_new_tokens = 128
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


def kv_bytes_per_row(model: Any, length: int) -> int:
    """KV-cache bytes one row's decode step reads in the engine: every slot of every layer (KV-shared layers read
    their source layer's cache again)."""
    text = model.model.language_model.config
    slots = sum((text.sliding_window if k == "sliding_attention" else length) + 1 for k in text.layer_types)
    return 2 * slots * text.num_key_value_heads * text.head_dim * next(model.parameters()).element_size()


def requests_for(kind: str, data: Path, n: int) -> list[Any]:
    """`n` requests as the pairs (kind='sampling') or eval stage builds them, cycling over the sample's train split."""
    from mathwizard.config import PairsConfig
    from mathwizard.data.splits import read_table
    from mathwizard.generation import Request
    from mathwizard.prompts import load_prompt
    from mathwizard.stages.pairs import _INPUT_COLUMNS, _items, _Sampler

    table = read_table(data / "02-teach", "train", _INPUT_COLUMNS)
    if kind == "sampling":
        sampler = _Sampler(PairsConfig(), lambda: None, [])  # type: ignore[arg-type,return-value]
        pool = [sampler.request(item) for item in _items(table, 0, seed)]
    else:
        system = load_prompt("tutor_system")
        pool = [Request(text=r["question"], image=r["image"], system=system) for r in table.to_pylist()]
    return [pool[i % len(pool)] for i in range(n)]


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measure(kind: str, model: Any, processor: Any, args: argparse.Namespace, card: dict[str, float]) -> dict[str, Any]:
    from mathwizard import decoding
    from mathwizard.generation import ModelGenerator, SamplingParams, _top_k, chat_messages, to_pil
    from mathwizard.models.kernels import apply_kernels, compute_figures, remove_kernels

    greedy = kind == "eval"
    temperature, top_p = (0.0, 1.0) if greedy else (1.0, 0.95)
    top_k = None if greedy else _top_k(model)  # as generate samples: the checkpoint's, else transformers' 50
    result: dict[str, Any] = {"temperature": temperature, "top_p": top_p, "top_k": top_k}

    # --- baseline: transformers' generate, batches of the old default size
    base = requests_for(kind, args.data, args.baseline_batch)
    eager = ModelGenerator(model=model, processor=processor, batch_size=args.baseline_batch, decode="eager")
    eager(base[:2], SamplingParams(4, temperature, top_p, seed))  # warm-up: kernels, allocator, image processor
    sync()
    started = time.perf_counter()
    done = eager(base, SamplingParams(args.baseline_new_tokens, temperature, top_p, seed))
    sync()
    base_s = time.perf_counter() - started
    base_tokens = sum(c.tokens for c in done)
    result["baseline"] = {
        "batch": args.baseline_batch,
        "max_new_tokens": args.baseline_new_tokens,
        "tokens": base_tokens,
        "seconds": round(base_s, 2),
        "tokens_per_s": base_tokens / base_s,
        "step_ms": 1e3 * base_s / args.baseline_new_tokens,
    }
    say(f"{kind} baseline (generate, batch {args.baseline_batch}): {base_tokens / base_s:,.0f} tokens/s")

    # --- candidate: the row engine, every request through one call
    render = processor.apply_chat_template
    n = args.prompts
    pool = requests_for(kind, args.data, 64)
    sample = [render(chat_messages(r), add_generation_prompt=True, tokenize=False) for r in pool]
    length = decoding.cache_length(max(len(i) for i in decoding.prompt_ids(processor, sample)), args.max_new_tokens)
    rows = decoding.rows_for(model, n or decoding.MAX_ROWS, length)
    requests = requests_for(kind, args.data, n or rows)
    shared = {"rows": rows, "length": length, "top_k": top_k, "temperature": temperature, "top_p": top_p}
    for figures in ("new", "known") if args.figures == "both" else (args.figures,):
        name = "candidate" if figures == "new" or args.figures == "known" else "candidate_figures_known"
        remove_kernels(model, ["vision_cache"])  # the tower as a stage alone loads it: no earlier task's figures
        if figures == "known":
            # as after SFT in a one-GPU pipeline: the process already holds every figure's tower output
            model.model.vision_tower.requires_grad_(False)  # frozen, as LoRA leaves it and inference loads have it
            apply_kernels(model, ["vision_cache"], start_figure_cache=True)
            distinct = {id(r.image): to_pil(r.image) for r in requests}  # the requests cycle over the sample's items
            computed = compute_figures(model, processor, list(distinct.values()))
            say(f"{kind}: {computed} distinct figures computed before the call (figures known)")
        result[name] = {"figures": figures, **_candidate(kind, model, processor, requests, args, card, **shared)}
        result[name]["vs_baseline"] = result[name]["tokens_per_s"] / result["baseline"]["tokens_per_s"]
        _print_candidate(kind, figures, result[name], result["baseline"])
    return result


def _candidate(
    kind: str,
    model: Any,
    processor: Any,
    requests: list[Any],
    args: argparse.Namespace,
    card: dict[str, float],
    *,
    rows: int,
    length: int,
    top_k: int | None,
    temperature: float,
    top_p: float,
) -> dict[str, Any]:
    from mathwizard import decoding
    from mathwizard.generation import _eos_ids, chat_messages

    render = processor.apply_chat_template
    eos = sorted(_eos_ids(model, processor))
    texts = [render(chat_messages(r), add_generation_prompt=True, tokenize=False) for r in requests]
    engines: list[Any] = []
    decoding.prepare_model(model)
    sync()
    started = time.perf_counter()
    answers = decoding.decode_all(
        model,
        processor,
        texts,
        [r.image for r in requests],
        max_new_tokens=args.max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        eos_ids=eos,
        graphs=model.device.type == "cuda",
        rows=rows,
        on_engine=engines.append,
        time_steps=True,
    )
    sync()
    seconds = time.perf_counter() - started
    tokens = sum(next((i + 1 for i, t in enumerate(a) if t in eos), len(a)) for a in answers)
    steps = engines[0].step_times_ms() if model.device.type == "cuda" else []
    timed = steps[2:] if len(steps) > 22 else steps  # the first replays: allocator and clocks settling
    step = spread(timed)
    weights = decode_weight_bytes(model)
    kv = kv_bytes_per_row(model, length) * rows
    bound_weights_ms = 1e3 * weights / card["copy_bytes_s"]
    bound_all_ms = 1e3 * (weights + kv) / card["copy_bytes_s"]
    return {
        "requests": len(requests),
        "rows": rows,
        "cache_length": length,
        "max_new_tokens": args.max_new_tokens,
        "tokens": tokens,
        "seconds": round(seconds, 2),
        "tokens_per_s": tokens / seconds,
        "step_ms": step,
        "steady_tokens_per_s": rows * 1e3 / step["median"] if step else None,
        "decode_s": round(sum(steps) / 1e3, 2),  # every decode step's CUDA-event time (none on a CPU)
        "weight_bytes": weights,
        "kv_bytes_per_step": kv,
        "decode_bound_ms_weights": bound_weights_ms,
        "decode_bound_ms_weights_kv": bound_all_ms,
        "fraction_of_bound_weights": bound_weights_ms / step["median"] if step else None,
        "fraction_of_bound_weights_kv": bound_all_ms / step["median"] if step else None,
        "peak_allocated_gib": _peak(),
        # wall seconds of the engine's prefills (figures, vision tower, prompts) and graph capture, the GPU synced
        "phase_s": {k: round(v, 2) for k, v in engines[0].phase_s.items()} if engines else None,
    }


def _print_candidate(kind: str, figures: str, c: dict[str, Any], baseline: dict[str, Any]) -> None:
    n, rows, tokens, seconds, step = c["requests"], c["rows"], c["tokens"], c["seconds"], c["step_ms"]
    say(
        f"{kind} graphs, figures {figures}: {c['tokens_per_s']:,.0f} tokens/s vs {baseline['tokens_per_s']:,.0f} "
        f"baseline -> {c['vs_baseline']:.1f}x ({n} requests, {rows} rows, {tokens:,} tokens in {seconds:.1f} s incl. "
        "prefill)"
    )
    if step:
        say(
            f"{kind} decode step: median {step['median']:.2f} ms (IQR {step['p25']:.2f}-{step['p75']:.2f}, min-max "
            f"{step['min']:.2f}-{step['max']:.2f}, {step['n']} steps) = {c['steady_tokens_per_s']:,.0f} tokens/s "
            f"steady; decode bound {c['decode_bound_ms_weights']:.2f} ms (weights once: "
            f"{c['fraction_of_bound_weights']:.1%} of it), {c['decode_bound_ms_weights_kv']:.2f} ms with the KV cache "
            f"({c['fraction_of_bound_weights_kv']:.1%})"
        )
    if c["phase_s"]:
        phases = c["phase_s"]
        say(
            f"{kind} outside the decode steps: prefill {phases['prefill']:.1f} s ({1e3 * phases['prefill'] / n:.1f}"
            f" ms a request), graph capture {phases['capture']:.1f} s, the rest"
            f" {seconds - phases['prefill'] - phases['capture'] - c['decode_s']:.1f} s"
        )


def _peak() -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default=task, choices=["sampling", "eval", "all"])
    parser.add_argument("--model", type=Path, default=DEFAULT_WORK / "e2b", help="Model folder (built if missing).")
    parser.add_argument("--data", type=Path, default=DEFAULT_WORK / "data", help="Stage folders (made if missing).")
    parser.add_argument("--backend", default=backend, choices=["hf", "unsloth"])
    parser.add_argument("--prompts", type=int, default=prompts)
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    parser.add_argument("--baseline-batch", type=int, default=baseline_batch)
    parser.add_argument("--baseline-new-tokens", type=int, default=baseline_new_tokens)
    parser.add_argument(
        "--kernels", default=None, help="model.kernels joined by '+', or 'none' (default: the setting's default)."
    )
    parser.add_argument(
        "--figures",
        default="new",
        choices=["new", "known", "both"],
        help="new: every figure through the vision tower in the call (a stage in its own process); known: their tower"
        " output computed before the call (`vision_cache`: after SFT in a one-GPU pipeline); both: one call each.",
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from mathwizard.models import backend as backends

    if args.backend == "unsloth":
        backends.configure_compile("eager")
        backends.activate("unsloth")
    import torch

    from mathwizard.models import load_model

    args.model, info, card, peaks = set_up(args.model, args.data)
    loading = time.perf_counter()
    kernels = parse_kernels(args.kernels)
    model, processor = load_model(str(args.model), args.backend, for_training=False, dtype="auto", kernels=kernels)
    model.eval()
    load_s = time.perf_counter() - loading
    say(
        f"loaded {args.model} ({args.backend}) in {load_s:.0f} s; copy bandwidth {card['copy_bytes_s'] / 1e12:.2f} "
        f"TB/s measured ({peaks['hbm_bytes_s'] / 1e12:.2f} datasheet); a decode step reads "
        f"{decode_weight_bytes(model) / 1e9:.2f} GB of weights"
    )
    report: dict[str, Any] = {
        "benchmark": "generation throughput",
        "command": "python benchmarks/gpu/bench_generation.py " + " ".join(sys.argv[1:]),
        "env": info,
        "card": {**card, **{f"datasheet_{k}": v for k, v in peaks.items()}},
        "settings": {k: str(v) for k, v in vars(args).items()},
        "load_s": round(load_s, 1),
        "start_to_loaded_s": round(time.perf_counter() - STARTED, 1),
    }
    if not torch.cuda.is_available():
        card.update(copy_bytes_s=1e11)  # a CPU check of the script: any bandwidth will do
    for kind in ["sampling", "eval"] if args.task == "all" else [args.task]:
        report[kind] = measure(kind, model, processor, args, card)
        write_json(args.json, report)
    say(env_line(info))
    os._exit(0)  # skip the slow teardown of CUDA state


if __name__ == "__main__":
    main()
