"""Scaling over several GPUs: tokens/s of SFT, DPO and flawed-answer sampling on N GPUs / (N x one GPU).

Usage (on a machine with N CUDA GPUs; the E2B-architecture model and the sample's stage folders are made when missing):
    python benchmarks/gpu/bench_scaling.py --gpus 2 --json scaling.json
    python benchmarks/gpu/bench_scaling.py --gpus 2 --parts sft --steps 20
    python benchmarks/gpu/bench_scaling.py --model tiny --gpus 2 --warmup 1 --steps 2 --prompts 4 --max-new-tokens 8

One command runs every part twice with torch's launcher, as the stages do (`mathwizard/launch.py`): `torchrun
--standalone --nproc-per-node 1`, then `--nproc-per-node N`. Training: the stage's trainer (`build_trainer`, hf backend:
Unsloth trains on one GPU only) at the recipe's effective batch (SFT 8 x 4 = 32 rows, DPO 4 x 2 = 8 pairs, as in
deployments/recipes/gemma-3n-e2b.yaml; on N GPUs the accumulation is divided by N, as the stage does), `warmup`
untimed optimizer steps then `steps` timed ones with the GPUs synchronised around each; tokens = the attention-mask
tokens of every rank's micro-batches. Sampling: every rank answers `--prompts` flawed-answer requests (the pairs
stage's, temperature 1.0) with the row engine (`model.decode: graphs`), as a rank of the pairs stage answers its share
of the chunks; the time runs from a barrier before the first rank starts to a barrier after the last one ends, after an
untimed warm-up call. Prints per part tokens/s on 1 and N GPUs and the scaling efficiency (goal: >= 0.9 for training,
>= 0.95 for sampling), then the env line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import DEFAULT_WORK, ensure_data, ensure_e2b, env_info, env_line, fmt, say, write_json

# -----------------------------------------------------------------------------
parts = "sft,dpo,sampling"
training = {"sft": (8, 4), "dpo": (4, 2)}  # micro-batch x accumulation on one GPU: the E2B recipe's
max_length = 2048
warmup = 3  # untimed optimizer steps (allocator growth, NCCL set-up, autotuning)
steps = 20  # timed optimizer steps
prompts = 256  # sampling requests per GPU
max_new_tokens = 1024  # the stages' budget
goals = {"sft": 0.9, "dpo": 0.9, "sampling": 0.95}
# -----------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=None, help="N (default: every visible CUDA device).")
    parser.add_argument("--parts", default=parts, help="Comma-separated: sft, dpo, sampling.")
    parser.add_argument("--model", type=Path, default=DEFAULT_WORK / "e2b", help="Model folder (built if missing).")
    parser.add_argument("--data", type=Path, default=DEFAULT_WORK / "data", help="Stage folders (made if missing).")
    parser.add_argument("--max-length", type=int, default=max_length)
    parser.add_argument("--warmup", type=int, default=warmup)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--prompts", type=int, default=prompts)
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--rank-part", default=None, help=argparse.SUPPRESS)  # a rank under torchrun
    parser.add_argument("--result", type=Path, default=None, help=argparse.SUPPRESS)
    return parser.parse_args()


# ------------------------------------------------------------------------------------------------- a rank
def _all_reduce(value: float) -> float:
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    device = "cuda" if torch.cuda.is_available() and dist.get_backend() == "nccl" else "cpu"
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return float(tensor.item())


def rank_training(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from _train import hooked_train

    from mathwizard.config import DPOConfig, ModelConfig, SFTConfig

    micro, accum = training[args.rank_part]
    common = {
        "max_steps": args.warmup + args.steps,
        "per_device_train_batch_size": micro,
        "gradient_accumulation_steps": accum,  # build_trainer divides it by WORLD_SIZE, as the stage's ranks do
        "max_length": args.max_length,
        "warmup_steps": 0,
        "save_steps": 10**6,
        "eval_steps": None,
        "gradient_checkpointing": False,
    }
    model_cfg = ModelConfig(name=str(args.model), backend="hf", dtype="auto", compile="eager")
    out = Path(tempfile.mkdtemp(prefix=f"bench-scaling-{args.rank_part}-"))
    if args.rank_part == "sft":
        from mathwizard.stages.sft import build_trainer

        trainer, _ = build_trainer(SFTConfig(**common), model_cfg, args.data / "02-teach", out)
    else:
        from mathwizard.stages.dpo import build_trainer

        trainer, _ = build_trainer(DPOConfig(**common), model_cfg, None, args.data / "04-pairs", out)
    timed: list[tuple[float, int]] = []
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    hooked_train(trainer, sync, lambda seconds, tokens, padded, loss: timed.append((seconds, tokens)), lambda: [])
    measured = timed[args.warmup :]
    seconds = sum(s for s, _ in measured)  # every rank steps together (DDP's all-reduce), so rank 0's time is the run's
    tokens = _all_reduce(sum(t for _, t in measured))
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def rank_sampling(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import torch.distributed as dist
    from bench_generation import requests_for

    from mathwizard.config import ModelConfig
    from mathwizard.generation import SamplingParams
    from mathwizard.models.ref import resolve

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank()
    generator = resolve(str(args.model)).generator(ModelConfig(name=str(args.model), backend="hf"), args.prompts)
    requests = requests_for("sampling", args.data, args.prompts)
    params = SamplingParams(args.max_new_tokens, temperature=1.0, top_p=0.95, seed=1000 + rank)
    generator(requests[: min(4, len(requests))], SamplingParams(8, temperature=1.0, top_p=0.95, seed=rank))  # warm-up
    dist.barrier()
    started = time.perf_counter()
    completions = generator(requests, params)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    dist.barrier()
    seconds = time.perf_counter() - started
    tokens = _all_reduce(sum(c.tokens for c in completions))
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


# ------------------------------------------------------------------------------------------------ the parent
def launch(args: argparse.Namespace, part: str, nprocs: int) -> dict[str, Any]:
    result = Path(tempfile.mkdtemp(prefix="bench-scaling-")) / "result.json"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nprocs}",
        str(Path(__file__).resolve()), "--rank-part", part, "--result", str(result),
        "--model", str(args.model), "--data", str(args.data), "--max-length", str(args.max_length),
        "--warmup", str(args.warmup), "--steps", str(args.steps), "--prompts", str(args.prompts),
        "--max-new-tokens", str(args.max_new_tokens),
    ]  # fmt: skip
    say(f"{part} on {nprocs} GPU(s): {' '.join(command[1:6])} ...")
    subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    return json.loads(result.read_text())


def main() -> None:
    args = parse_args()
    if args.rank_part is not None:
        outcome = rank_training(args) if args.rank_part in training else rank_sampling(args)
        if int(os.environ.get("RANK", "0")) == 0:
            write_json(args.result, outcome)
        return

    import torch

    n = args.gpus or torch.cuda.device_count()
    if n < 2:
        sys.exit("bench_scaling needs --gpus N >= 2 (or N visible CUDA devices)")
    args.model = ensure_e2b(args.model)
    ensure_data(args.data)
    report: dict[str, Any] = {"gpus": n, "env": env_info(), "parts": {}}
    for part in args.parts.split(","):
        one, many = launch(args, part, 1), launch(args, part, n)
        efficiency = many["tokens_per_s"] / (n * one["tokens_per_s"])
        report["parts"][part] = {"one": one, "many": many, "efficiency": round(efficiency, 3), "goal": goals[part]}
        write_json(args.json, report)
    for part, numbers in report["parts"].items():
        one, many = numbers["one"]["tokens_per_s"], numbers["many"]["tokens_per_s"]
        verdict = "meets" if numbers["efficiency"] >= numbers["goal"] else "below"
        say(
            f"{part}: {n} GPUs {fmt(many)} tokens/s vs 1 GPU {fmt(one)} -> scaling efficiency"
            f" {numbers['efficiency']:.3f} ({verdict} the goal {numbers['goal']:.2f})"
        )
    say(env_line(report["env"]))


if __name__ == "__main__":
    main()
