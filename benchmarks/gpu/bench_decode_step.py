"""The row engine's decode step and prefill on the GPU, its attention now against its attention before, in one command.

Usage (on a CUDA machine; the E2B-architecture model and the sample's stage folders are made when missing):
    python benchmarks/gpu/bench_decode_step.py --rows 1024 --offset 512 --json decode_step.json --profile out/

Variants, each on a fresh engine over the same cache size:
- `previous`: the engine's decode attention before (commit c173f83): two batched matrix products over every cache
  slot with a boolean mask and float32 scores.
- `current`: `mathwizard.decode_attention` (the Triton kernel over each row's valid prefix). The prefill is the same
  in both (scaled_dot_product_attention with the boolean mask and shared KV heads); its time is reported per variant.
- `own`: `current` with gemma-3n's own RMSNorm and AltUp code (`model.kernels` off: `remove_kernels`), the baseline
  of the fused kernels (`mathwizard.models.kernels`) that every other variant runs with.
- `compiled`: `current` with each decoder layer of the language model under torch.compile (Inductor, in place;
  prefill widths vary, so dynamo marks them dynamic after the second); its compile time is printed apart.

Per variant: `--prefill-chunks` prefills of the engine's chunk size (32 prompts each, the pairs stage's requests:
instruction + figure + question + reference solution), timed one by one; then every row is set live at its prompt's
length + `--offset` (the middle of a 1,024-token answer by default; the rows past the prefilled ones reuse those
prompts' lengths over an empty cache, which costs the same to read), the step captured as a CUDA graph, `--warmup`
replays and `--steps` timed replays (CUDA events; median, IQR, min-max). The cache is sized as the stage sizes it
(longest prompt + 1,024 new tokens). `--profile DIR`: one eager step and one prefill chunk per variant under
torch.profiler, the top kernels in DIR/decode-profile-<variant>.txt.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path
from typing import Any

from _common import (
    DEFAULT_WORK,
    say,
    set_up,
    spread,
    write_json,
)

from mathwizard.config import ModelConfig

STARTED = time.perf_counter()


def previous_rows_attention(
    module: Any, query: Any, key: Any, value: Any, attention_mask: Any, scaling: float | None = None, **_: Any
) -> tuple[Any, None]:
    """The engine's decode attention as it was (the baseline): every slot read, masked; the prefill as now."""
    import torch

    from mathwizard.decode_attention import reference

    heads, dim = query.shape[1], query.shape[3]
    scale = scaling if scaling is not None else dim**-0.5
    if attention_mask.dtype != torch.bool:  # the valid-prefix lengths the engine passes now: read every slot anyway
        return reference(query, key, value, attention_mask, scale), None
    key, value = key.to(query.dtype), value.to(query.dtype)
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, scale=scale, enable_gqa=key.shape[1] != heads
    )
    return out.transpose(1, 2).contiguous(), None


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measure(variant: str, model: Any, processor: Any, prompts: list[Any], args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from mathwizard import decode_attention, decoding

    original_rows, original_supported = decoding.rows_attention, decode_attention.supported
    if variant == "compiled":
        from mathwizard.models.backend import compile_decoder_layers

        compile_decoder_layers(model)
    if variant == "own":
        from mathwizard.models.kernels import remove_kernels

        remove_kernels(model)
    if variant == "previous":
        decoding.rows_attention = previous_rows_attention  # registered by the engine below
        decode_attention.supported = lambda *_: False
    try:
        return _measure(variant, model, processor, prompts, args)
    finally:
        decoding.rows_attention, decode_attention.supported = original_rows, original_supported
        if variant == "own":
            from mathwizard.models.kernels import apply_kernels

            apply_kernels(model, ModelConfig().kernels)
        gc.collect()
        torch.cuda.empty_cache()


def _measure(variant: str, model: Any, processor: Any, prompts: list[Any], args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from mathwizard import decoding
    from mathwizard.generation import _eos_ids, _top_k

    length = decoding.cache_length(max(len(p.input_ids) for p in prompts), 1024)
    cuda = torch.cuda.is_available()
    engine = decoding.RowEngine(model, args.rows, length, sorted(_eos_ids(model, processor)), graphs=cuda)
    engine.sampling = (1.0, _top_k(model), 0.95, False)  # the pairs stage's sampling
    engine.out = torch.zeros(args.rows, 1024, dtype=torch.long, device=engine.tokens.device)
    config = engine.net.config
    saved = config._attn_implementation_internal
    config._attn_implementation_internal = decoding.ATTENTION
    result: dict[str, Any] = {"rows": args.rows, "cache_length": length, "offset": args.offset}
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    try:
        with torch.inference_mode():
            chunk = engine.prefill_rows
            seconds = []
            for c in range(args.prefill_chunks):
                rows = list(range(c * chunk, (c + 1) * chunk))
                batch = prompts[c * chunk : (c + 1) * chunk]
                sync()
                started = time.perf_counter()
                engine._prefill(rows, batch, processor, [1024] * len(batch))
                sync()
                seconds.append(time.perf_counter() - started)
            tokens = sum(len(p.input_ids) for p in prompts[: args.prefill_chunks * chunk])
            result["prefill_chunk_s"] = spread(seconds[1:] or seconds)  # the first: kernels and allocator warm up
            result["first_prefill_chunk_s"] = seconds[0]  # with `compiled`: the compile
            result["prefill_tokens_per_s"] = tokens / sum(seconds)
            lengths = torch.tensor([len(prompts[i % len(prompts)].input_ids) for i in range(args.rows)])
            engine.positions.copy_((lengths + args.offset).clamp(max=length - 1).to(engine.positions.device))
            engine.done.fill_(False)
            engine.counts.zero_()
            engine.limits.fill_(10**6)
            capturing = time.perf_counter()
            if cuda:
                engine._capture()
            result["capture_s"] = time.perf_counter() - capturing  # with `compiled`: the decode shapes' compile
            for _ in range(args.warmup):
                engine.step()
            engine.step_events.clear()
            wall = []  # the CPU check of this script: wall time per step
            for _ in range(args.steps):
                sync()
                started = time.perf_counter()
                engine.step(time_it=True)
                sync()
                wall.append(1e3 * (time.perf_counter() - started))
            step = spread(engine.step_times_ms() if cuda else wall)
            result["step_ms"] = step
            result["steady_tokens_per_s"] = args.rows * 1e3 / step["median"]
            result["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None
            if args.profile:
                engine.graph = None
                _profile(lambda: engine._step(), args.profile / f"decode-profile-{variant}.txt", "decode step")
                rows = list(range(chunk))
                _profile(
                    lambda: engine._prefill(rows, prompts[:chunk], processor, [1024] * chunk),
                    args.profile / f"prefill-profile-{variant}.txt",
                    "prefill chunk",
                )
    finally:
        config._attn_implementation_internal = saved
    say(
        f"{variant}: decode step median {step['median']:.2f} ms (IQR {step['p25']:.2f}-{step['p75']:.2f}, min-max "
        f"{step['min']:.2f}-{step['max']:.2f}, {step['n']} steps) = {result['steady_tokens_per_s']:,.0f} tokens/s at "
        f"{args.rows} rows; prefill chunk median {result['prefill_chunk_s']['median']:.3f} s "
        f"({result['prefill_tokens_per_s']:,.0f} prompt tokens/s); first chunk "
        f"{result['first_prefill_chunk_s']:.1f} s, capture {result['capture_s']:.1f} s; "
        f"peak {result['peak_allocated_gib']} GiB"
    )
    return result


def _profile(work: Any, path: Path, what: str) -> None:
    """`work` once more under torch.profiler: its operators and kernels by their own GPU time."""
    from torch.profiler import ProfilerActivity, profile

    sync()
    work()  # warm
    sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        work()
        sync()
    table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=90)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{what}\n{table}\n")
    say(f"  profile of one {what}: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_WORK / "e2b")
    parser.add_argument("--data", type=Path, default=DEFAULT_WORK / "data")
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--offset", type=int, default=512, help="Answer tokens each row is taken to have decoded.")
    parser.add_argument("--prefill-chunks", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--variants", default="previous,current")
    parser.add_argument("--profile", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from bench_generation import requests_for

    from mathwizard import decoding
    from mathwizard.generation import chat_messages
    from mathwizard.models import load_model

    args.model, info, card, _ = set_up(args.model, args.data)
    model, processor = load_model(
        str(args.model), "hf", for_training=False, dtype="auto", kernels=ModelConfig().kernels
    )
    model.eval()
    decoding.prepare_model(model)
    requests = requests_for("sampling", args.data, max(args.rows, args.prefill_chunks * 32))
    render = processor.apply_chat_template
    texts = [render(chat_messages(r), add_generation_prompt=True, tokenize=False) for r in requests]
    ids = decoding.prompt_ids(processor, texts)
    prompts = [decoding.Prompt(i, p, r.image) for i, (p, r) in enumerate(zip(ids, requests, strict=True))]
    report: dict[str, Any] = {
        "benchmark": "row engine decode step and prefill",
        "command": "python benchmarks/gpu/bench_decode_step.py " + " ".join(sys.argv[1:]),
        "env": info,
        "card": card,
        "settings": {k: str(v) for k, v in vars(args).items()},
        "variants": {},
    }
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    for name in names:
        report["variants"][name] = measure(name, model, processor, prompts, args)
        write_json(args.json, report)
    base = report["variants"][names[0]]
    for name in names[1:]:
        new = report["variants"][name]
        step_ratio = base["step_ms"]["median"] / new["step_ms"]["median"]
        prefill_ratio = base["prefill_chunk_s"]["median"] / new["prefill_chunk_s"]["median"]
        new["step_speedup"], new["prefill_speedup"] = step_ratio, prefill_ratio
        say(
            f"decode step: {name} {new['step_ms']['median']:.2f} ms vs {names[0]} {base['step_ms']['median']:.2f} "
            f"ms -> {step_ratio:.2f}x; prefill chunk {new['prefill_chunk_s']['median']:.3f} s vs "
            f"{base['prefill_chunk_s']['median']:.3f} s -> {prefill_ratio:.2f}x"
        )
    write_json(args.json, report)
    os._exit(0)


if __name__ == "__main__":
    main()
