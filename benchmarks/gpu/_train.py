"""Training throughput of the SFT / DPO stages: variants of backend, micro-batch and gradient checkpointing.

A variant is `<kind>:<micro>x<accum>[:gc][:compile][:fresh][:k=<kernels>]`: kind `plain` (SFT only: a minimal
transformers + PEFT loop, the baseline), `hf` (the stage's transformers + PEFT + TRL trainer) or `unsloth` (the stage's
Unsloth trainer); micro = rows (DPO: pairs) per micro-batch, accum = micro-batches per optimizer step; `gc` turns
gradient checkpointing on; `compile` builds it with `model.compile: layers` instead of `eager` (each decoder layer of
the language model under torch.compile, `compile_decoder_layers`; for `plain` too, whose loop trains the same model);
`k=` sets `model.kernels` (names joined by `+`, or `none` for the model's own code; default: the setting's default, all
of them). `fresh` empties `vision_cache`'s figures before every step, so every figure is a first sighting, as in SFT's
first epoch and in every DPO step of a real run (the sample's ~50 figures are otherwise all cached after a few steps:
SFT's later epochs).

Each variant builds the stage's trainer exactly as the stage does (`build_trainer`: the same collator, LoRA targets,
arguments and compilation) on the same model and data, then runs `warmup + steps` optimizer steps, each of the
variant's full micro x accum rows (`fill_every_step`: the sample's rows repeated and read in order, so every variant
trains the same steps); every step is timed with the GPU synchronised before and after. The `plain` loop takes the
same batches from that trainer's data loader and the same PEFT model, and trains it with `model(**batch).loss` (full
logits, transformers' cross-entropy), backward and AdamW: no TRL in the step.

Reported per variant: median step time and its spread (min-max, IQR) over the timed steps, tokens/s (tokens the
model processed, attention-mask ones: image soft tokens, prompt and answer, padding excluded, over the timed steps'
total time), peak GPU memory (`max_memory_allocated`, weights included), time to first step (process start to the
end of step 1: imports, model load, trainer build, first step; for a `compile` variant its compilation too: dynamo's
in-memory caches are reset after each such variant, Inductor's on-disk cache is not) and MFU: 3 forward passes per
token (SFT; DPO 4: the reference's forward too) x the forward FLOPs per token counted by `torch.utils.flop_counter`
on the first batch (vision tower, decoder, LM head; counted eagerly) / the datasheet's bf16 peak.

Variants of the hf/plain kinds share one process, Unsloth's run in another (Unsloth patches transformers when
imported; `eager` and `layers` set the same Unsloth switches, so compiled and eager Unsloth variants can share it).
Within a process the model is loaded afresh for each variant.
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import (
    DEFAULT_WORK,
    datasheet,
    env_line,
    fmt,
    parse_kernels,
    say,
    set_up,
    spread,
    write_json,
)
from _profile import is_label, labelled_modules, module_table, time_by_module

STARTED = time.perf_counter()  # the process's start, for time to first step
FORWARDS_PER_STEP = {"sft": 3, "dpo": 4}  # model FLOPs of one training step, in forward passes over the batch


def parse_args(stage: str, defaults: dict[str, Any], doc: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_WORK / "e2b", help="Model folder (built if missing).")
    parser.add_argument("--data", type=Path, default=DEFAULT_WORK / "data", help="Stage folders (made if missing).")
    parser.add_argument(
        "--variants",
        default=defaults["variants"],
        help="kind:MICROxACCUM[:gc][:compile][:fresh][:k=a+b|none], comma-separated.",
    )
    parser.add_argument("--baseline", default=None, help="Variant the others are compared with (default: first).")
    parser.add_argument("--max-length", type=int, default=defaults["max_length"])
    parser.add_argument("--warmup", type=int, default=defaults["warmup"], help="Untimed optimizer steps.")
    parser.add_argument("--steps", type=int, default=defaults["steps"], help="Timed optimizer steps.")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--profile",
        action="store_true",
        help="Profile one more optimizer step after the timed ones (torch.profiler; not in the figures): its top "
        "kernels and how busy the GPU was, in <json folder>/<stage>-profile-<variant>.txt.",
    )
    parser.add_argument(
        "--summarize",
        type=Path,
        default=None,
        help="Run nothing: summarize the step files a run left in this folder (<stage>-hf.json, <stage>-unsloth.json;"
        " a run stopped before its summary, e.g. by a timeout).",
    )
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.stage = stage
    return args


VARIANT_FLAGS = ("gc", "compile", "fresh")  # gradient checkpointing; model.compile: layers; vision_cache emptied


def parse_variant(name: str) -> dict[str, Any]:
    from mathwizard.models.kernels import KERNELS

    kind, shape, *flags = name.split(":")
    micro, accum = (int(x) for x in shape.split("x"))
    chosen = [f.removeprefix("k=") for f in flags if f.startswith("k=")]
    kernels = parse_kernels(chosen[-1] if chosen else None)
    plain = [f for f in flags if not f.startswith("k=")]
    if kind not in ("plain", "hf", "unsloth") or set(plain) - set(VARIANT_FLAGS) or set(kernels) - set(KERNELS):
        raise SystemExit(f"bad variant {name!r}: use plain|hf|unsloth:MICROxACCUM[:gc][:compile][:fresh][:k=a+b|none]")
    return {
        "name": name,
        "kind": kind,
        "micro": micro,
        "accum": accum,
        "gc": "gc" in plain,
        "compile": "compile" in plain,
        "fresh": "fresh" in plain,
        "kernels": kernels,
    }


# ---------------------------------------------------------------------------------------------------- worker
def worker(args: argparse.Namespace) -> None:
    """Run this process's variants in turn; write what each measured to `args.result` after every step."""
    variants = [parse_variant(v) for v in args.worker.split(",")]
    backend = "unsloth" if variants[0]["kind"] == "unsloth" else "hf"
    report: dict[str, Any] = {"variants": {}}
    save = lambda: write_json(args.result, report)  # noqa: E731
    from mathwizard.models import backend as backends

    if backend == "unsloth":
        backends.configure_compile("eager")
        backends.activate("unsloth")  # before transformers and TRL are imported
    import torch  # noqa: F401
    import transformers  # noqa: F401
    import trl  # noqa: F401

    report["import_s"] = round(time.perf_counter() - STARTED, 1)  # part of every variant's time to first step
    for variant in variants:
        result: dict[str, Any] = {**variant}
        report["variants"][variant["name"]] = result
        try:
            run_variant(args, variant, result, save, "forward_flops" not in report, report["import_s"])
            report.setdefault("forward_flops", result.get("forward_flops"))
        except Exception as exc:  # an OOM or a failure ends this variant, not the benchmark
            result["error"] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
            say(f"  {variant['name']}: {result['error']}")
        save()
        _release(compiled=variant["compile"])
    os._exit(0)  # skip interpreter teardown of CUDA state (seconds, sometimes a hang)


def _release(compiled: bool = False) -> None:
    import torch

    if compiled:  # the next variant's layers compile afresh (its time to first step includes that), not from memory
        torch._dynamo.reset()
    from mathwizard.models.kernels import forget_figures

    forget_figures()  # every variant starts with no figure known (the process's cache would carry them over)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def run_variant(
    args: argparse.Namespace,
    variant: dict[str, Any],
    result: dict[str, Any],
    save: Any,
    count_flops: bool,
    report_import_s: float,
) -> None:
    import torch

    from mathwizard.config import DPOConfig, ModelConfig, SFTConfig

    backend = "unsloth" if variant["kind"] == "unsloth" else "hf"
    compile_mode = "layers" if variant["compile"] else "eager"  # layers: build_trainer compiles the decoder layers
    model_cfg = ModelConfig(
        name=str(args.model), backend=backend, dtype="auto", compile=compile_mode, kernels=variant["kernels"]
    )
    common = {
        "max_steps": args.warmup + args.steps + (1 if args.profile else 0),
        "per_device_train_batch_size": variant["micro"],
        "gradient_accumulation_steps": variant["accum"],
        "max_length": args.max_length,
        "warmup_steps": 0,
        "save_steps": 10**6,
        "eval_steps": None,
        "logging_steps": 1,
        "gradient_checkpointing": variant["gc"],
    }
    out = Path(tempfile.mkdtemp(prefix=f"bench-{args.stage}-"))
    dynamo_before = dynamo_stats() if variant["compile"] else {}
    begun = time.perf_counter()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    if args.stage == "sft":
        from mathwizard.stages.sft import build_trainer

        cfg = SFTConfig(**common)
        trainer, facts = build_trainer(cfg, model_cfg, args.data / "02-teach", out)
    else:
        from mathwizard.stages.dpo import build_trainer

        cfg = DPOConfig(**common)
        trainer, facts = build_trainer(cfg, model_cfg, None, args.data / "04-pairs", out)
    result["build_s"] = round(time.perf_counter() - begun, 1)
    result["facts"] = facts
    result["dataset_rows"] = fill_every_step(trainer, variant["micro"] * variant["accum"], args.warmup + args.steps)
    result["trainable_parameters"] = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    result["lora"] = cfg.lora.model_dump(mode="json")
    if count_flops and backend == "hf":
        result.update(count_forward_flops(trainer))
    save()

    steps: list[dict[str, Any]] = []
    result["steps"] = steps
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def record(seconds: float, tokens: int, padded: int, sequences: int, loss: float | None) -> None:
        steps.append(
            {"seconds": round(seconds, 4), "tokens": tokens, "padded": padded, "sequences": sequences, "loss": loss}
        )
        if len(steps) == 1:  # a fresh process: its imports, then this variant's load, build and first step
            result["first_step_s"] = round(report_import_s + time.perf_counter() - begun, 1)
        result["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None
        if variant["compile"]:  # after every step: a run stopped early still says what dynamo did
            result["dynamo"] = {k: v - dynamo_before[k] for k, v in dynamo_stats().items()}
        save()
        say(f"  {variant['name']} step {len(steps)}: {seconds:.2f} s, {tokens} tokens, loss {fmt(loss, '.4f')}")

    if variant["kind"] == "plain":
        plain_loop(trainer, cfg, variant["accum"], args.warmup + args.steps, sync, record, fresh=variant["fresh"])
    else:
        profile = None
        if args.profile and args.result:
            name = re.sub(r"[^A-Za-z0-9]+", "_", variant["name"])
            profile = (args.warmup + args.steps, args.result.parent / f"{args.stage}-profile-{name}.txt")
        hooked_train(trainer, sync, record, lambda: steps, profile, fresh=variant["fresh"])
    from mathwizard.models.kernels import figure_cache

    cache = figure_cache(trainer.model)
    if cache is not None:
        result["figure_cache"] = {"hits": cache.hits, "misses": cache.misses, "held": len(cache.features)}
        say(f"  {variant['name']}: vision_cache {result['figure_cache']}")
    if cuda:
        result["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
    if variant["compile"]:
        result["dynamo"] = {k: v - dynamo_before[k] for k, v in dynamo_stats().items()}
        say(f"  {variant['name']}: dynamo {result['dynamo']}")
    result["done"] = True
    del trainer


def fill_every_step(trainer: Any, rows: int, steps: int) -> int:
    """Give every step the variant's full `rows` (micro x accum), as a real run's steps have them.

    The sample's ~50 rows end an epoch every other step, and the trainer's last step of an epoch takes only the rows
    left (SFT: 19 of 32), so half the timed steps were short, where MM_Math's 5,300-row epoch has one short step in
    166; and the plain loop, cycling micro-batches across epochs, trained other steps than the trainers. The rows are
    repeated, in order, to `rows x steps`, and read in order (no shuffle), so every variant trains the same steps and
    no row comes twice within a step while the sample has more rows than a step: a `fresh` step's figures are all
    new, as in a first epoch. Returns the training set's rows."""
    import datasets
    from torch.utils.data import SequentialSampler

    rows_needed = rows * steps
    original = trainer.train_dataset
    if len(original) < rows_needed:
        trainer.train_dataset = datasets.concatenate_datasets([original] * -(-rows_needed // len(original)))
    trainer._get_train_sampler = lambda *_, **__: SequentialSampler(trainer.train_dataset)
    return len(trainer.train_dataset)


def dynamo_stats() -> dict[str, int]:
    """Dynamo's counts so far in this process: graphs compiled and graph breaks (a compiled variant reports what it
    added: 0 graphs means its layers ran eagerly after all)."""
    from torch._dynamo.utils import counters

    return {
        "graphs": int(counters["stats"]["unique_graphs"]),
        "graph_breaks": int(sum(counters["graph_break"].values())),
    }


def batch_tokens(inputs: dict[str, Any]) -> tuple[int, int, int]:
    """(real tokens, padded tokens, sequences) of a collated batch (SFT: input_ids, a sequence a row; DPO: prompt +
    chosen + rejected, TRL's collator stacking chosen and rejected: two sequences a pair)."""
    pairs = [("input_ids", "attention_mask")]
    pairs += [(f"{p}_input_ids", f"{p}_attention_mask") for p in ("prompt", "chosen", "rejected", "completion")]
    real = padded = 0
    for ids, mask in pairs:
        if ids in inputs:
            padded += inputs[ids].numel()
            real += int(inputs[mask].sum()) if mask in inputs else inputs[ids].numel()
    sequences = next((len(inputs[k]) for k in ("input_ids", "prompt_input_ids") if k in inputs), 0)
    return real, padded, sequences


def hooked_train(
    trainer: Any,
    sync: Any,
    record: Any,
    steps_seen: Any,
    profile: tuple[int, Path] | None = None,
    fresh: bool = False,
) -> None:
    """trainer.train() with each optimizer step timed (GPU synchronised) and its micro-batches' tokens counted;
    `profile` (step index, file): that step runs under torch.profiler and is left out of the figures; `fresh`: the
    cached figures are forgotten before each step (untimed)."""
    from transformers import TrainerCallback

    from mathwizard.models.kernels import clear_figure_cache

    micro: list[tuple[int, int, int]] = []
    original = trainer.training_step

    def counting_step(model: Any, inputs: dict[str, Any], *a: Any, **k: Any) -> Any:
        micro.append(batch_tokens(inputs))
        return original(model, inputs, *a, **k)

    trainer.training_step = counting_step

    class StepTimer(TrainerCallback):
        profiler: Any = None

        def on_step_begin(self, *_: Any, **__: Any) -> None:
            if fresh:
                clear_figure_cache(trainer.model)
            sync()
            if profile is not None and len(steps_seen()) == profile[0]:
                self.labels = labelled_modules(trainer.model)
                self.labels.__enter__()
                self.profiler = start_profiler()
            self.t0, self.first = time.perf_counter(), len(micro)

        def on_step_end(self, *_: Any, **__: Any) -> None:
            sync()
            seconds = time.perf_counter() - self.t0
            batch = micro[self.first :]
            if self.profiler is not None:
                self.labels.__exit__(None, None, None)
                write_profile(self.profiler, seconds, profile[1])  # type: ignore[index]
                self.profiler = None
                return  # not a timed step
            record(seconds, *(sum(m[i] for m in batch) for i in range(3)), None)

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **_: Any) -> None:
            if logs and "loss" in logs and steps_seen():
                steps_seen()[-1]["loss"] = logs["loss"]

    trainer.add_callback(StepTimer())
    trainer.train()


def start_profiler() -> Any:
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    profiler = profile(activities=activities)
    profiler.__enter__()
    return profiler


def write_profile(profiler: Any, seconds: float, path: Path) -> None:
    """The step's kernels: GPU busy time (union of kernel intervals) against the step's wall time, then the top
    kernels and operators by their own GPU (else CPU) time."""
    import torch
    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import EventList

    profiler.__exit__(None, None, None)
    events = [e for e in profiler.events() if not is_label(e)]  # the module ranges are no operators nor kernels
    spans = sorted((e.time_range.start, e.time_range.end) for e in events if e.device_type == DeviceType.CUDA)
    busy = kernel_sum = 0.0
    end = float("-inf")
    for start, stop in spans:
        kernel_sum += stop - start
        if start > end:
            busy += stop - start
        elif stop > end:
            busy += stop - end
        end = max(end, stop)
    lines = [
        f"profiled step: {seconds:.3f} s wall (under the profiler); {len(spans)} kernels, GPU busy {busy / 1e6:.3f} s "
        f"({busy / 1e6 / seconds:.1%} of the step), kernel time summed {kernel_sum / 1e6:.3f} s",
    ]
    waits = [e for e in events if e.name in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")]
    lines.append(
        f"host waits for the GPU: {len(waits)} synchronize calls, {sum(e.cpu_time_total for e in waits) / 1e3:.1f} ms"
        " (each one empties the queue the CPU had built ahead)"
    )
    lines.append(module_table(time_by_module(profiler.events(), on_device=bool(spans))))
    device = "cuda" if torch.cuda.is_available() else None
    averages = EventList([a for a in profiler.key_averages() if not is_label(a)], use_device=device)
    for key in ("self_device_time_total", "self_cuda_time_total", "self_cpu_time_total"):
        try:
            lines.append(averages.table(sort_by=key, row_limit=40, max_name_column_width=90))
            break
        except (AttributeError, KeyError, ValueError):
            continue
    path.write_text("\n".join(lines) + "\n")
    say(f"  profile: {lines[0]} -> {path}")


def plain_loop(trainer: Any, cfg: Any, accum: int, total: int, sync: Any, record: Any, fresh: bool = False) -> None:
    """The baseline: the same PEFT model and batches, trained by `model(**batch).loss`, backward and AdamW; `fresh`
    as in `hooked_train`."""
    import itertools

    import torch

    from mathwizard.models.kernels import clear_figure_cache

    model = trainer.model
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    batches = itertools.cycle(trainer.get_train_dataloader())
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=torch.cuda.is_available())
    for _ in range(total):
        if fresh:
            clear_figure_cache(model)
        sync()
        started = time.perf_counter()
        tokens = padded = sequences = 0
        losses = []
        for _ in range(accum):
            batch = trainer._prepare_inputs(next(batches))
            real, pad, n = batch_tokens(batch)
            tokens, padded, sequences = tokens + real, padded + pad, sequences + n
            with autocast:
                loss = model(**batch, use_cache=False).loss / accum
            loss.backward()
            losses.append(loss.detach())
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        record(time.perf_counter() - started, tokens, padded, sequences, float(sum(losses)))


def count_forward_flops(trainer: Any) -> dict[str, Any]:
    """Forward FLOPs of the first training batch (vision tower + decoder + lm_head), and its token count."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    tokens, _, _ = batch_tokens(batch)  # DPO: chosen and rejected sequences, each with its prompt
    model_inputs = ("input_ids", "attention_mask", "pixel_values", "token_type_ids")
    inputs = {k: v for k, v in batch.items() if k in model_inputs}
    # Eagerly even where the layers are compiled: the counter sees aten ops, which Inductor's kernels are not. And
    # through eager attention: the counter's SDPA formula asserts as many KV heads as query heads (on CUDA), which
    # `model.kernels`' SDPA with shared KV heads is not; the products it counts are the same.
    text_config = trainer.model.config.text_config
    attention = text_config._attn_implementation
    trainer.model.set_attn_implementation({"text_config": "eager"})
    try:
        with torch.compiler.set_stance("force_eager"), torch.no_grad(), FlopCounterMode(display=False) as counter:
            trainer.model(**inputs, use_cache=False)
    finally:
        trainer.model.set_attn_implementation({"text_config": attention})
    trainer.model.zero_grad(set_to_none=True)
    return {"forward_flops": counter.get_total_flops(), "forward_flops_tokens": tokens}


# ---------------------------------------------------------------------------------------------------- parent
def summarize(result: dict[str, Any], warmup: int) -> dict[str, Any]:
    steps = result.get("steps") or []
    timed = steps[warmup:]
    summary: dict[str, Any] = {"steps_done": len(steps), "timed_steps": len(timed)}
    if timed:
        seconds = sum(s["seconds"] for s in timed)
        summary["step_s"] = spread([s["seconds"] for s in timed])
        summary["tokens_per_step"] = statistics.median(s["tokens"] for s in timed)
        summary["tokens_per_s"] = sum(s["tokens"] for s in timed) / seconds
        summary["padding_share"] = 1 - sum(s["tokens"] for s in timed) / sum(s["padded"] for s in timed)
        summary["warmup_extra_s"] = sum(s["seconds"] for s in steps[:warmup]) - warmup * summary["step_s"]["median"]
    return summary


def parent(args: argparse.Namespace, script: Path) -> None:
    if args.summarize:  # another run's step files: no model, data, card or GPU needed
        info, ceilings, peaks = {}, {}, datasheet("")
        say(f"summarizing the step files in {args.summarize} (nothing is run)")
    else:
        args.model, info, ceilings, peaks = set_up(args.model, args.data)
        say(
            f"card: bf16 matmul {ceilings['matmul_bf16_flops'] / 1e12:.0f} TFLOP/s measured "
            f"(datasheet {peaks['bf16_flops'] / 1e12:.0f}), copy {ceilings['copy_bytes_s'] / 1e12:.2f} TB/s"
        )
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    variants = [parse_variant(v) for v in names]
    if args.stage == "dpo" and any(v["kind"] == "plain" for v in variants):
        raise SystemExit("the plain loop is an SFT baseline; DPO compares its own variants")
    groups = {
        "hf": [v["name"] for v in variants if v["kind"] != "unsloth"],
        "unsloth": [v["name"] for v in variants if v["kind"] == "unsloth"],
    }
    report: dict[str, Any] = {
        "benchmark": f"{args.stage} training throughput",
        "command": " ".join(["python", str(script.relative_to(script.parents[2])), *sys.argv[1:]]),
        "env": info,
        "card": {**ceilings, **{f"datasheet_{k}": v for k, v in peaks.items()}},
        "settings": {k: str(v) for k, v in vars(args).items()},
        "variants": {},
    }
    # Each worker process writes its progress beside the report (or in a temporary folder), step by step.
    scratch = args.json.parent if args.json else Path(tempfile.mkdtemp(prefix=f"bench-{args.stage}-results-"))
    worker_args = ["--model", str(args.model), "--data", str(args.data), "--max-length", str(args.max_length)]
    worker_args += ["--warmup", str(args.warmup), "--steps", str(args.steps)] + (["--profile"] if args.profile else [])
    flops = None
    for group, members in groups.items():
        if not members:
            continue
        result_file = (args.summarize or scratch) / f"{args.stage}-{group}.json"
        command = [sys.executable, str(script), "--worker", ",".join(members), "--result", str(result_file)]
        say(f"--- {group} process: {', '.join(members)}")
        code = None if args.summarize else subprocess.run([*command, *worker_args]).returncode
        done = _read(result_file)
        flops = flops or done.get("forward_flops")
        for name in members:
            result = done.get("variants", {}).get(name, {"error": f"worker exit code {code}"})
            result["import_s"] = done.get("import_s")
            result["summary"] = summarize(result, args.warmup)
            report["variants"][name] = result
        write_json(args.json, report)

    # --- ratios, MFU, table
    base_name = args.baseline or names[0]
    base = report["variants"].get(base_name, {}).get("summary", {})
    tokens = next((r.get("forward_flops_tokens") for r in report["variants"].values() if r.get("forward_flops")), None)
    per_token = FORWARDS_PER_STEP[args.stage] * flops / tokens if flops and tokens else None
    report["model_flops_per_token"] = per_token
    say(
        f"\n{args.stage}: {args.warmup} warm-up + {args.steps} timed optimizer steps per variant, max_length "
        f"{args.max_length}; baseline {base_name}"
    )
    say(
        f"{'variant':<18} {'rows/step':>9} {'tokens/s':>9} {'vs base':>7} {'step s (median)':>15} {'min-max':>13} "
        f"{'IQR':>13} {'peak GiB':>8} {'MFU':>6} {'1st step s':>10}  note"
    )
    for name, r in report["variants"].items():
        s = r["summary"]
        speed = s.get("tokens_per_s")
        ratio = speed / base["tokens_per_s"] if speed and base.get("tokens_per_s") else None
        s["vs_baseline"] = ratio
        if per_token and speed:
            s["mfu"] = per_token * speed / peaks["bf16_flops"]
        step = s.get("step_s", {})
        rows = r.get("micro", 0) * r.get("accum", 0) if "micro" in r else None
        note = r.get("error", "") or ("" if r.get("done") else "unfinished")
        span = f"{fmt(step.get('min'), '.2f')}-{fmt(step.get('max'), '.2f')}"
        iqr = f"{fmt(step.get('p25'), '.2f')}-{fmt(step.get('p75'), '.2f')}"
        say(
            f"{name:<18} {fmt(rows, 'd'):>9} {fmt(speed):>9} {fmt(ratio, '.2f'):>7} "
            f"{fmt(step.get('median'), '.2f'):>15} {span:>13} {iqr:>13} {fmt(r.get('peak_allocated_gib'), '.1f'):>8} "
            f"{fmt(s.get('mfu'), '.1%'):>6} {fmt(r.get('first_step_s'), '.0f'):>10}  {note}"
        )
    for name, r in report["variants"].items():
        s = r["summary"]
        if name != base_name and s.get("vs_baseline"):
            say(
                f"{args.stage} {name}: {s['tokens_per_s']:,.0f} tokens/s vs {base['tokens_per_s']:,.0f} baseline "
                f"({base_name}) -> {s['vs_baseline']:.2f}x, step {s['step_s']['median']:.2f} s "
                f"(min-max {s['step_s']['min']:.2f}-{s['step_s']['max']:.2f}), peak "
                f"{fmt(r.get('peak_allocated_gib'), '.1f')} GiB, MFU {fmt(s.get('mfu'), '.1%')}"
            )
    write_json(args.json, report)
    if info:
        say(env_line(info))


def _read(path: Path) -> dict[str, Any]:
    import json

    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def main(stage: str, defaults: dict[str, Any], doc: str, script: Path) -> None:
    args = parse_args(stage, defaults, doc)
    if args.worker:
        worker(args)
    else:
        parent(args, script)
