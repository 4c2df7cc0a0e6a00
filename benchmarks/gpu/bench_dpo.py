"""DPO training throughput on the GPU: the stage's trainers at the old and the new micro-batch settings.

Usage (on a CUDA machine; the E2B-architecture model and the sample's stage folders are made when missing):
    python benchmarks/gpu/bench_dpo.py --json dpo.json
    python benchmarks/gpu/bench_dpo.py --variants unsloth:2x4:gc,hf:8x1 --steps 20

DPO from the base model with a new LoRA (the stage's path without an SFT adapter); the reference is the same model
with the adapter disabled. The baseline (first variant) is the settings the recipe had: 2 pairs per micro-batch with
gradient checkpointing, on Unsloth (the default backend), measured at 2,180 tokens/s on the H200 on 2026-12-01.
Tokens are chosen + rejected sequences with their prompts. How it measures: benchmarks/gpu/_train.py.
"""

from __future__ import annotations

from pathlib import Path

from _train import main

# -----------------------------------------------------------------------------
defaults = {
    "variants": "unsloth:2x4:gc,hf:8x1,unsloth:8x1,hf:4x2",
    "max_length": 2048,
    "warmup": 2,
    "steps": 20,
}
# -----------------------------------------------------------------------------

if __name__ == "__main__":
    main("dpo", defaults, __doc__, Path(__file__).resolve())
