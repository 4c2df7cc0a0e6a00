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

`--load unsloth|hf --model <folder>` times the tower of a model loaded for training as the stages load it (the
weights' dtypes as that backend leaves them; printed), with two more flags: `autocast` (the forward under
`torch.autocast(cuda, bf16)`, as the trainers run it) and `uniform` (the tower's float32 weights cast to bf16, what
`model.kernels: uniform_dtype` does). Its default variants: the tower as SFT's first epoch ran it before
`uniform_dtype` (`folded+autocast`), the same weights cast (`folded+uniform+autocast`), and the cast tower outside
autocast as the figure cache now computes it (`folded+uniform`).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(Path(__file__).parent)]

from _common import DEFAULT_WORK, env_info, env_line, say, spread, write_json  # noqa: E402

SIZE = 768  # gemma-3n's figures
VARIANTS = "nchw,folded,folded+channels_last"
LOADED_VARIANTS = "folded+autocast,folded+uniform+autocast,folded+uniform"
FLAGS = ("nchw", "folded", "channels_last", "tuned", "autocast", "uniform")


def time_variant(tower, batch: int, variant: str, warmup: int, steps: int, reference, size: int = SIZE) -> dict:
    import torch

    from mathwizard.models.kernels import apply_kernels, cast_to_bf16, remove_kernels

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
    dtypes = {name: p.dtype for name, p in tower.named_parameters()}
    if "uniform" in flags:
        cast_to_bf16(tower)
    pixels = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device, torch.bfloat16)
    pixels = pixels.contiguous(memory_format=layout)
    mixed = torch.autocast(device.type, dtype=torch.bfloat16, enabled="autocast" in flags)
    began = time.perf_counter()
    with torch.inference_mode(), mixed:
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
    for name, param in tower.named_parameters():  # as loaded again, for the next variant
        param.data = param.data.to(dtypes[name])
    error = None
    if reference is not None:
        error = ((out.float() - reference).abs().max() / reference.abs().max()).item()
    return {"ms": spread(times), "warmup_s": round(first_s, 2), "max_rel_diff": error, "out": out.float()}


def loaded_tower(model_dir: Path, backend: str):
    """The vision tower of the model as SFT loads it (training mode, the attention folded; no other kernel)."""
    from mathwizard.models import backend as backends

    if backend == "unsloth":
        backends.configure_compile("eager")
        backends.activate("unsloth")
    from mathwizard.models import load_model

    model, _ = load_model(str(model_dir), backend, for_training=True, dtype="auto", kernels=["vision_attention"])
    return model.model.vision_tower


def dtype_summary(tower) -> dict:
    """Per dtype: how many weight tensors and elements, and the kinds of module holding float32 ones."""
    summary: dict = {}
    for name, param in tower.named_parameters():
        entry = summary.setdefault(str(param.dtype), {"tensors": 0, "elements": 0, "modules": set()})
        entry["tensors"] += 1
        entry["elements"] += param.numel()
        if str(param.dtype) == "torch.float32":
            owner = tower.get_submodule(name.rsplit(".", 1)[0]) if "." in name else tower
            entry["modules"].add(type(owner).__name__)
    for entry in summary.values():
        entry["modules"] = sorted(entry["modules"])
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="8,32")
    parser.add_argument("--variants", default=None, help="Comma-separated; the first is the baseline.")
    parser.add_argument(
        "--load",
        default="random",
        choices=["random", "hf", "unsloth"],
        help="random: the tower alone, built in bf16; hf/unsloth: the tower of --model loaded for training by that"
        " backend",
    )
    parser.add_argument("--model", type=Path, default=DEFAULT_WORK / "e2b")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--device", default="cuda", help="cpu: a check of this script, not a figure")
    parser.add_argument("--size", type=int, default=SIZE, help="Figure side (smaller: a quick CPU check)")
    args = parser.parse_args()
    import torch
    from transformers import AutoModel

    from mathwizard.models.random_e2b import e2b_config

    report: dict = {"env": env_info(), "batches": {}, "load": args.load}
    if args.load == "random":
        tower = AutoModel.from_config(e2b_config().vision_config).to(args.device, torch.bfloat16).eval()
    else:
        tower = loaded_tower(args.model, args.load)
        report["tower_dtypes"] = dtype_summary(tower)
        say(f"vision tower of {args.model} loaded by {args.load} for training: {report['tower_dtypes']}")
    args.variants = args.variants or (VARIANTS if args.load == "random" else LOADED_VARIANTS)
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
