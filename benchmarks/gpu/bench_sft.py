"""SFT training throughput on the GPU: Unsloth vs transformers + PEFT + TRL, same batch, length and LoRA settings.

Usage (on a CUDA machine; the E2B-architecture model and the sample teach data are built when missing):
    python benchmarks/gpu/bench_sft.py --json sft.json
    python benchmarks/gpu/bench_sft.py --variants hf,unsloth:eager --batch-size 4 --max-length 1024 --steps 10

Prints tokens/s, peak GPU memory, MFU, first-step and compile seconds per variant, and the ratio of each Unsloth
variant to the hf baseline measured in the same command. How it measures: benchmarks/gpu/_train.py.
"""

from __future__ import annotations

from pathlib import Path

from _train import main

# -----------------------------------------------------------------------------
defaults = {
    "variants": "hf,unsloth:eager,unsloth:modules,unsloth:unsloth",
    "batch_size": 4,  # the recipe's per-device batch
    "grad_accum": 2,  # the recipe's is 8; 2 keeps the optimizer share and gives more timed steps per minute
    "max_length": 1024,  # the sample's longest example is ~680 tokens with the E2B processor (256 image tokens)
    "warmup": 3,  # untimed steps: compilation, allocator growth
    "steps": 6,  # timed steps (= 6 x 2 x 4 = 48 examples)
    "cap": 300,  # seconds one variant may take (a compile that runs longer is reported as such)
}
# -----------------------------------------------------------------------------

if __name__ == "__main__":
    main("sft", defaults, __doc__, Path(__file__).resolve())
