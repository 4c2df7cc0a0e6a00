"""Training throughput of the project's own SFT / DPO trainers: one worker process per variant, one parent table.

A variant is `hf` (transformers + PEFT + TRL) or `unsloth:<compile>` (Unsloth with `model.compile` = eager |
modules | unsloth); a `:4bit` suffix loads the base weights in 4 bit (QLoRA, `model.load_in_4bit`). Each worker
builds the stage's trainer exactly as the stage does (`build_trainer`: collator, LoRA, arguments), then runs
`warmup + steps` optimizer steps with a callback that synchronises the GPU and times every step. Throughput counts
the tokens the model processed (attention-mask ones: prompt, image soft tokens and answer; padding excluded) over
the timed steps only, so compilation and allocator warm-up stay out of it; the warm-up steps minus their
steady-state cost are reported as compile time. Peak memory is `torch.cuda.max_memory_allocated` over training
(weights included).

MFU uses model FLOPs: the forward FLOPs of the first batch, counted by `torch.utils.flop_counter` in the hf worker
(every matmul, convolution and attention of the vision tower and the decoder, lm_head included), times 3 for a
training step (forward + backward, the usual 6N convention) and, for DPO, plus one forward for the reference;
divided by the step time and the card's datasheet bf16 peak. LoRA skips the frozen weights' gradients, so the
card executes fewer FLOPs than this convention counts.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from math import nan
from pathlib import Path
from typing import Any

from _common import (
    DEFAULT_WORK,
    card_ceilings,
    datasheet,
    ensure_e2b,
    ensure_pairs,
    ensure_teach,
    env_info,
    env_line,
    fmt,
    run_variants,
    say,
    write_json,
)

# Model FLOPs of one step, in forward passes over the batch: SFT fwd + bwd (2x); DPO the same plus the reference.
FORWARDS_PER_STEP = {"sft": 3, "dpo": 4}


def parse_args(stage: str, defaults: dict[str, Any], doc: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_WORK / "e2b", help="Model folder (built if missing).")
    parser.add_argument("--data", type=Path, default=None, help="Teach folder (SFT) or pairs folder (DPO).")
    parser.add_argument("--variants", default=defaults["variants"], help="hf, unsloth:<compile>[:4bit], ...")
    parser.add_argument("--batch-size", type=int, default=defaults["batch_size"])
    parser.add_argument("--grad-accum", type=int, default=defaults["grad_accum"])
    parser.add_argument("--max-length", type=int, default=defaults["max_length"])
    parser.add_argument("--pad-to-multiple-of", type=int, default=None, help="Unsloth SFT collator padding.")
    parser.add_argument("--warmup", type=int, default=defaults["warmup"], help="Untimed optimizer steps.")
    parser.add_argument("--steps", type=int, default=defaults["steps"], help="Timed optimizer steps.")
    parser.add_argument("--cap", type=float, default=defaults["cap"], help="Seconds one variant may take.")
    parser.add_argument("--budget", type=float, default=1e9, help="Seconds the whole benchmark may take.")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.stage = stage
    return args


# ---------------------------------------------------------------------------------------------------- worker
def worker(args: argparse.Namespace) -> None:
    """Train one variant and write what it measured to `args.result` (progress after every step)."""
    import os

    backend, *modes = args.worker.split(":")
    four_bit = "4bit" in modes
    compile_mode = next((m for m in modes if m and m != "4bit"), "eager")
    result: dict[str, Any] = {
        "backend": backend,
        "compile": compile_mode if backend == "unsloth" else None,
        "load_in_4bit": four_bit,
    }
    save = lambda: write_json(args.result, result)  # noqa: E731

    started = time.perf_counter()
    if os.environ.get("MW_TRACE_S"):  # diagnosis of a stall: every thread's stack, every MW_TRACE_S seconds
        import faulthandler

        faulthandler.dump_traceback_later(float(os.environ["MW_TRACE_S"]), repeat=True)
    from mathwizard.models import backend as backends

    if backend == "unsloth":
        backends.configure_compile(compile_mode)
        backends.activate("unsloth")
        result["import_unsloth_s"] = round(time.perf_counter() - started, 1)
        save()
    import torch

    from mathwizard.config import DPOConfig, ModelConfig, SFTConfig

    model_cfg = ModelConfig(
        name=str(args.model), backend=backend, dtype="auto", compile=compile_mode, load_in_4bit=four_bit
    )
    common = {
        "max_steps": args.warmup + args.steps,
        "per_device_train_batch_size": args.batch_size,
        "gradient_accumulation_steps": args.grad_accum,
        "max_length": args.max_length,
        "warmup_steps": 0,
        "save_steps": 10**6,
        "eval_steps": None,
        "logging_steps": 1,
        "gradient_checkpointing": True,
    }
    out = Path(tempfile.mkdtemp(prefix=f"bench-{args.stage}-"))
    built = time.perf_counter()
    if args.stage == "sft":
        from mathwizard.stages.sft import build_trainer

        cfg = SFTConfig(**common, pad_to_multiple_of=args.pad_to_multiple_of)
        trainer, facts = build_trainer(cfg, model_cfg, args.data, out)
    else:
        from mathwizard.stages.dpo import build_trainer

        cfg = DPOConfig(**common)
        trainer, facts = build_trainer(cfg, model_cfg, None, args.data, out)
    result["build_s"] = round(time.perf_counter() - built, 1)
    result["facts"] = facts
    result["settings"] = {k: v for k, v in cfg.model_dump(mode="json").items() if k != "lora"}
    result["lora"] = cfg.lora.model_dump(mode="json")
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    result["trainable_parameters"] = trainable
    save()

    if backend == "hf":  # model FLOPs, once, on the variant that runs plain PyTorch ops
        result.update(count_forward_flops(trainer))
        save()

    # --- per-step timing and token counts
    micro: list[dict[str, int]] = []
    original_step = trainer.training_step

    def counting_step(model: Any, inputs: dict[str, Any], *a: Any, **k: Any) -> Any:
        mask = inputs.get("attention_mask")
        ids = inputs["input_ids"]
        say(f"  micro-batch {len(micro) + 1} starts at {time.perf_counter() - started:.1f} s, shape {tuple(ids.shape)}")
        micro.append(
            {"tokens": int(mask.sum()) if mask is not None else ids.numel(), "padded": ids.numel(), "seq": ids.shape[1]}
        )
        return original_step(model, inputs, *a, **k)

    trainer.training_step = counting_step
    steps: list[dict[str, Any]] = []
    cuda = torch.cuda.is_available()  # the CPU path exists to check this script on a laptop with the tiny model
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    peak = (lambda: round(torch.cuda.max_memory_allocated() / 2**30, 2)) if cuda else (lambda: None)
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *_: Any, **__: Any) -> None:
            sync()
            self.t0, self.first = time.perf_counter(), len(micro)

        def on_step_end(self, *_: Any, **__: Any) -> None:
            sync()
            batch = micro[self.first :]
            steps.append(
                {
                    "seconds": round(time.perf_counter() - self.t0, 4),
                    "tokens": sum(m["tokens"] for m in batch),
                    "padded": sum(m["padded"] for m in batch),
                    "seq": sorted({m["seq"] for m in batch}),
                }
            )
            result["steps"] = steps
            result["peak_allocated_gib"] = peak()
            save()
            last = steps[-1]
            say(f"  step {len(steps)}: {last['seconds']:.2f} s, {last['tokens']} tokens, lengths {last['seq']}")

    trainer.add_callback(StepTimer())
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        result["allocated_before_train_gib"] = round(torch.cuda.memory_allocated() / 2**30, 2)
    trained = time.perf_counter()
    trainer.train()
    result["train_s"] = round(time.perf_counter() - trained, 1)
    result["peak_allocated_gib"] = peak()
    if cuda:
        result["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
    result["final_loss"] = next((r["loss"] for r in reversed(trainer.state.log_history) if "loss" in r), None)
    result["done"] = True
    save()
    os._exit(0)  # skip interpreter teardown of compiled graphs and CUDA state (seconds, sometimes a hang)


def count_forward_flops(trainer: Any) -> dict[str, Any]:
    """Forward FLOPs of the first training batch (vision tower + decoder + lm_head), and its token count."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    skip = {"labels", "completion_mask", "ref_chosen_logps", "ref_rejected_logps"}
    inputs = {k: v for k, v in batch.items() if k not in skip}
    model = trainer.model
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(**inputs, use_cache=False)
    tokens = int(batch["attention_mask"].sum())
    model.zero_grad(set_to_none=True)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"forward_flops": counter.get_total_flops(), "forward_flops_tokens": tokens}


# ---------------------------------------------------------------------------------------------------- parent
def summarize(result: dict[str, Any], warmup: int) -> dict[str, Any]:
    steps = result.get("steps") or []
    timed = steps[warmup:]
    summary: dict[str, Any] = {"steps_done": len(steps)}
    if steps:
        summary["first_step_s"] = steps[0]["seconds"]
    if timed:
        seconds = sum(s["seconds"] for s in timed)
        summary["step_s_median"] = statistics.median(s["seconds"] for s in timed)
        summary["tokens_per_s"] = sum(s["tokens"] for s in timed) / seconds
        summary["padded_tokens_per_s"] = sum(s["padded"] for s in timed) / seconds
        summary["padding_share"] = 1 - sum(s["tokens"] for s in timed) / sum(s["padded"] for s in timed)
        summary["sequence_lengths"] = sorted({n for s in steps for n in s["seq"]})
        warm = steps[:warmup]
        summary["warmup_s"] = sum(s["seconds"] for s in warm)
        # What warm-up cost beyond steady-state steps: compilation, autotuning, allocator growth.
        summary["compile_s_estimate"] = max(0.0, summary["warmup_s"] - len(warm) * summary["step_s_median"])
    return summary


def parent(args: argparse.Namespace, script: Path) -> None:
    import torch

    started = time.time()
    deadline = started + args.budget
    args.model = ensure_e2b(args.model)
    default = DEFAULT_WORK / "data" / ("02-teach" if args.stage == "sft" else "04-pairs")
    args.data = Path(args.data or default)
    if args.stage == "sft":
        ensure_teach(args.data)
    else:  # a finished pairs folder is used as it is; a missing one is built beside its teach folder
        ensure_pairs(args.data, args.data.parent / "02-teach")
    info = env_info()
    ceilings = card_ceilings() if torch.cuda.is_available() else {"matmul_bf16_flops": nan, "copy_bytes_s": nan}
    peaks = datasheet(info.get("gpu", ""))
    say(env_line(info))
    say(
        f"card: bf16 matmul {ceilings['matmul_bf16_flops'] / 1e12:.0f} TFLOP/s measured "
        f"(datasheet {peaks['bf16_flops'] / 1e12:.0f}), copy {ceilings['copy_bytes_s'] / 1e12:.2f} TB/s"
    )
    worker_args = [
        "--model", str(args.model), "--data", str(args.data), "--batch-size", str(args.batch_size),
        "--grad-accum", str(args.grad_accum), "--max-length", str(args.max_length), "--warmup", str(args.warmup),
        "--steps", str(args.steps),
    ]  # fmt: skip
    if args.pad_to_multiple_of:
        worker_args += ["--pad-to-multiple-of", str(args.pad_to_multiple_of)]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    scratch = Path(tempfile.mkdtemp(prefix=f"bench-{args.stage}-results-"))
    report: dict[str, Any] = {
        "benchmark": f"{args.stage} training throughput",
        "command": "python " + " ".join([str(script.relative_to(script.parents[2])), *sys_argv()]),
        "env": info,
        "card": {**ceilings, **{f"datasheet_{k}": v for k, v in peaks.items()}},
        "settings": vars(args) | {"model": str(args.model), "data": str(args.data), "json": str(args.json)},
    }
    results = {}

    def progress() -> None:
        report["variants"] = results
        write_json(args.json, report)

    for variant in variants:
        results.update(run_variants(script, [variant], worker_args, deadline=deadline, cap_s=args.cap, scratch=scratch))
        results[variant]["summary"] = summarize(results[variant], args.warmup)
        progress()

    # --- model FLOPs per token from the hf worker's count, then MFU and ratios
    hf = results.get("hf", {})
    flops_per_token = None
    if hf.get("forward_flops") and hf.get("forward_flops_tokens"):
        flops_per_token = FORWARDS_PER_STEP[args.stage] * hf["forward_flops"] / hf["forward_flops_tokens"]
    report["model_flops_per_token"] = flops_per_token
    for r in results.values():
        s = r["summary"]
        if flops_per_token and s.get("tokens_per_s"):
            s["mfu"] = flops_per_token * s["tokens_per_s"] / peaks["bf16_flops"]
            s["mfu_vs_measured_matmul"] = flops_per_token * s["tokens_per_s"] / ceilings["matmul_bf16_flops"]
    base = hf.get("summary", {})
    lines = []
    header = (
        f"{'variant':<16} {'tokens/s':>9} {'vs hf':>6} {'peak GiB':>9} {'vs hf':>6} {'MFU':>6} "
        f"{'step s':>7} {'1st step s':>10} {'compile s':>9}  note"
    )
    for name, r in results.items():
        s = r["summary"]
        speed = s.get("tokens_per_s")
        peak = r.get("peak_allocated_gib")
        ratio = speed / base["tokens_per_s"] if speed and base.get("tokens_per_s") else None
        mem_ratio = peak / hf["peak_allocated_gib"] if peak and hf.get("peak_allocated_gib") else None
        s["speed_vs_hf"], s["memory_vs_hf"] = ratio, mem_ratio
        note = r.get("error", "") or ("" if r.get("done") else "unfinished")
        lines.append(
            f"{name:<16} {fmt(speed):>9} {fmt(ratio, '.2f'):>6} {fmt(peak, '.1f'):>9} {fmt(mem_ratio, '.2f'):>6} "
            f"{fmt(s.get('mfu'), '.1%'):>6} {fmt(s.get('step_s_median'), '.2f'):>7} "
            f"{fmt(s.get('first_step_s'), '.1f'):>10} {fmt(s.get('compile_s_estimate'), '.0f'):>9}  {note}"
        )
    progress()
    lora = next((r["lora"] for r in results.values() if r.get("lora")), {})
    say(
        f"\n{args.stage}: batch {args.batch_size} x accum {args.grad_accum}, max_length {args.max_length}, "
        f"{args.warmup} warm-up + {args.steps} timed steps, LoRA r={lora.get('r')} on {lora.get('target_modules')}"
    )
    say(header)
    for line in lines:
        say(line)
    for name, r in results.items():
        s = r["summary"]
        if name != "hf" and s.get("speed_vs_hf"):
            say(
                f"{args.stage} {name}: {s['tokens_per_s']:,.0f} tokens/s vs {base['tokens_per_s']:,.0f} baseline -> "
                f"{s['speed_vs_hf']:.2f}x faster, peak memory {s['memory_vs_hf']:.2f}x, MFU {fmt(s.get('mfu'), '.1%')}"
            )
    say(env_line(info))


def sys_argv() -> list[str]:
    import sys

    return sys.argv[1:]


def main(stage: str, defaults: dict[str, Any], doc: str, script: Path) -> None:
    args = parse_args(stage, defaults, doc)
    if args.worker:
        worker(args)
    else:
        parent(args, script)
