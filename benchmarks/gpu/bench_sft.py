"""SFT training throughput on the GPU: the stage's trainers (hf, Unsloth) vs a minimal transformers + PEFT loop.

Usage (on a CUDA machine; the E2B-architecture model and the sample's stage folders are made when missing):
    python benchmarks/gpu/bench_sft.py --json sft.json
    python benchmarks/gpu/bench_sft.py --variants plain:8x4,hf:8x4,hf:8x4:gc --steps 20
    python benchmarks/gpu/bench_sft.py --model tiny --variants plain:2x1,hf:2x1 --warmup 1 --steps 2   # CPU check

Every variant trains the recipe's effective batch (micro x accum = 32 rows) unless told otherwise. Prints per
variant the median step and its spread, tokens/s and the ratio to the baseline (the first variant: the plain loop),
peak memory, MFU and time to first step. How it measures: benchmarks/gpu/_train.py.
"""

from __future__ import annotations

from pathlib import Path

from _train import main

# -----------------------------------------------------------------------------
defaults = {
    # plain loop (baseline), the stage's trainer at the recipe's defaults, the levers one at a time
    "variants": "plain:8x4,hf:8x4,unsloth:8x4,hf:16x2,hf:8x4:gc,hf:4x8:gc",
    "max_length": 2048,  # the recipe's; the sample's examples are 609-677 tokens (256 of them image tokens)
    "warmup": 2,  # untimed steps: allocator growth, cuBLAS/cuDNN autotuning
    "steps": 20,  # timed steps
}
# -----------------------------------------------------------------------------

if __name__ == "__main__":
    main("sft", defaults, __doc__, Path(__file__).resolve())
