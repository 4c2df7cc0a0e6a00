"""DPO training throughput on the GPU: Unsloth vs transformers + PEFT + TRL, same batch, length and LoRA settings.

Usage (on a CUDA machine; the E2B-architecture model and rule-built pairs from the sample are made when missing):
    python benchmarks/gpu/bench_dpo.py --json dpo.json
    python benchmarks/gpu/bench_dpo.py --variants hf,unsloth:eager --data <run>/04-pairs

DPO from the base model with a new LoRA (the stage's `sft=None` path); the reference is the same model with the
adapter disabled. Prints tokens/s (chosen + rejected sequences), peak memory, MFU and the ratio to the hf
baseline measured in the same command. How it measures: benchmarks/gpu/_train.py.
"""

from __future__ import annotations

from pathlib import Path

from _train import main

# -----------------------------------------------------------------------------
defaults = {
    "variants": "hf,unsloth:eager",
    "batch_size": 2,  # pairs per micro-batch (the recipe's): 4 sequences with chosen and rejected
    "grad_accum": 2,  # the recipe's is 4
    "max_length": 1024,
    "warmup": 3,
    "steps": 6,
    "cap": 300,
}
# -----------------------------------------------------------------------------

if __name__ == "__main__":
    main("dpo", defaults, __doc__, Path(__file__).resolve())
