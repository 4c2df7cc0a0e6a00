"""The vision tower alone: gemma-3n E2B's timm MobileNetV5 on 768 x 768 figures, forward only, as SFT's first epoch,
DPO and the row engine's prefill run it. The model's own (NCHW, cuDNN's heuristics, timm's attention) against
`model.kernels: vision_attention`, the convolutions' memory layout and cuDNN's algorithm choice.

Usage: python benchmarks/gpu/bench_vision.py [--batches 8,32] [--variants nchw,folded,...] [--warmup 3] [--steps 20]
    [--json out.json]

Variants, `+`-joined flags on the baseline `nchw` (the tower as loaded): `folded` (`vision_attention`: the multi-query
attention blocks through a fused SDPA kernel, `mathwizard.models.kernels.folded_mqa_forward`), `channels_last`
(weights and figures in NHWC, the layout cuDNN's tensor-core convolutions use natively), `tuned`
(`torch.backends.cudnn.benchmark`: cuDNN times its algorithms for each new shape once). Random weights of the real
architecture (bf16); the output is checked against the baseline's. A step is one forward, timed with the GPU
synchronised; reported: median ms a figure, spread, ratio. Session 7's first run (7bb3d8d): channels_last 1.05-1.07x,
tuned 1.00x, so the default set is the attention with and without NHWC.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(Path(__file__).parent)]

from _common import env_info, env_line, say, spread, write_json  # noqa: E402

SIZE = 768  # gemma-3n's figures
VARIANTS = "nchw,folded,folded+channels_last"
FLAGS = ("nchw", "folded", "channels_last", "tuned")


def time_variant(tower, batch: int, variant: str, warmup: int, steps: int, reference, size: int = SIZE) -> dict:
    import torch

    from mathwizard.models.kernels import apply_kernels, remove_kernels

    flags = set(variant.split("+"))
    if flags - set(FLAGS):
        raise SystemExit(f"unknown flags {sorted(flags - set(FLAGS))} in {variant!r}; choose from {', '.join(FLAGS)}")
    device = next(tower.parameters()).device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    layout = torch.channels_last if "channels_last" in flags else torch.contiguous_format
    torch.backends.cudnn.benchmark = "tuned" in flags
    remove_kernels(tower)
    if "folded" in flags:
        assert apply_kernels(tower, ["vision_attention"])["vision_attention"] > 0
    tower.to(memory_format=layout)
    pixels = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device, torch.bfloat16)
    pixels = pixels.contiguous(memory_format=layout)
    began = time.perf_counter()
    with torch.inference_mode():
        for _ in range(warmup):
            out = tower(pixel_values=pixels, do_pooling=False, return_dict=True).last_hidden_state
        sync()
        first_s = time.perf_counter() - began
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            out = tower(pixel_values=pixels, do_pooling=False, return_dict=True).last_hidden_state
            sync()
            times.append((time.perf_counter() - t0) * 1e3)
    error = None
    if reference is not None:
        error = ((out.float() - reference).abs().max() / reference.abs().max()).item()
    return {"ms": spread(times), "warmup_s": round(first_s, 2), "max_rel_diff": error, "out": out.float()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="8,32")
    parser.add_argument("--variants", default=VARIANTS, help="Comma-separated; the first is the baseline.")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--device", default="cuda", help="cpu: a check of this script, not a figure")
    parser.add_argument("--size", type=int, default=SIZE, help="Figure side (smaller: a quick CPU check)")
    args = parser.parse_args()
    import torch
    from transformers import AutoModel

    from mathwizard.models.random_e2b import e2b_config

    tower = AutoModel.from_config(e2b_config().vision_config).to(args.device, torch.bfloat16).eval()
    report: dict = {"env": env_info(), "batches": {}}
    for batch in (int(b) for b in args.batches.split(",")):
        results: dict = {}
        variants = args.variants.split(",")
        for variant in variants:
            base = results[variants[0]]["out"] if results else None
            results[variant] = time_variant(tower, batch, variant, args.warmup, args.steps, base, args.size)
        baseline = results[variants[0]]["ms"]["median"]
        for variant, r in results.items():
            r.pop("out")
            ms = r["ms"]
            r["ratio"] = baseline / ms["median"]
            say(
                f"vision batch {batch:>3} {variant:<20} {ms['median'] / batch:6.2f} ms a figure (step"
                f" {ms['median']:.1f} ms,"
                f" IQR {ms['p25']:.1f}-{ms['p75']:.1f}, min-max {ms['min']:.1f}-{ms['max']:.1f}) -> {r['ratio']:.2f}x"
                f" vs {variants[0]}; warm-up {r['warmup_s']} s; max diff {r['max_rel_diff'] or 0:.1e}"
            )
        report["batches"][str(batch)] = results
    say(env_line(report["env"]))
    write_json(args.json, report)


if __name__ == "__main__":
    main()
