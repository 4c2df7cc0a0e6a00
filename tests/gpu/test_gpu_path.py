"""The Unsloth path on a CUDA machine: SFT, DPO and batched generation through the stages, on the tiny gemma-3n.

Marked `gpu` (CI deselects the marker and has no GPU anyway); skipped cleanly where CUDA or Unsloth is missing.
Run on the GPU machine: `python -m pytest -m gpu tests/gpu` (about a minute, most of it `import unsloth`).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not _cuda(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(importlib.util.find_spec("unsloth") is None, reason="needs unsloth (pip install '.[gpu]')"),
]

TRAIN = {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 1, "max_length": 512, "warmup_steps": 0}


@pytest.fixture(scope="module")
def model_cfg():
    from mathwizard.config import ModelConfig

    return ModelConfig(name="tiny", backend="unsloth", compile="eager")


@pytest.fixture(scope="module")
def sft_out(tmp_path_factory: pytest.TempPathFactory, model_cfg) -> Path:
    from mathwizard.config import SFTConfig
    from mathwizard.stages import sft
    from tests.training.builders import teach_folder, use_session_model_cache

    use_session_model_cache(tmp_path_factory)
    root = tmp_path_factory.mktemp("gpu")
    teach = teach_folder(root / "02-teach", n_train=4, n_val=2)
    sft.run(SFTConfig(max_steps=2, save_steps=2, **TRAIN), model_cfg, teach, root / "03-sft")
    return root / "03-sft"


def test_sft_trains_a_lora_adapter_with_unsloth_on_the_gpu(sft_out: Path) -> None:
    from safetensors.torch import load_file

    from mathwizard.manifest import read_manifest

    manifest = read_manifest(sft_out)
    assert manifest is not None
    extra = manifest.extra
    assert (extra["backend"], extra["device"], extra["dtype"]) == ("unsloth", "cuda", "bfloat16")
    assert manifest.counts["steps"] == 2  # max_steps
    weights = load_file(str(sft_out / "adapter" / "adapter_model.safetensors"))
    lora_b = [t for name, t in weights.items() if "lora_B" in name]
    assert lora_b, "the adapter holds no LoRA B matrices"
    # LoRA starts with B = 0, so any non-zero B shows that two optimizer steps changed the adapter.
    assert any(t.abs().sum() > 0 for t in lora_b)


def test_model_compile_eager_reached_unsloth(sft_out: Path) -> None:
    from unsloth_zoo.temporary_patches import common

    from mathwizard.models.backend import undo_timm_compile

    # Unsloth read UNSLOTH_COMPILE_DISABLE when the SFT stage imported it with model.compile="eager".
    assert common.UNSLOTH_COMPILE_DISABLE is True
    # ... and the timm blocks Unsloth compiles at every load regardless were given back their eager forwards.
    assert undo_timm_compile() == []


def test_dpo_trains_on_the_sft_model_with_unsloth(sft_out: Path, model_cfg, tmp_path: Path) -> None:
    from mathwizard.config import DPOConfig
    from mathwizard.stages import dpo
    from tests.training.builders import pairs_folder

    pairs = pairs_folder(tmp_path / "04-pairs", n_train=4, n_val=0)
    manifest = dpo.run(DPOConfig(max_steps=2, save_steps=2, **TRAIN), model_cfg, sft_out, pairs, tmp_path / "05-dpo")
    assert (manifest.extra["backend"], manifest.counts["steps"]) == ("unsloth", 2)
    assert manifest.extra["final_rewards_accuracies"] is not None  # DPO's own metrics were logged
    assert (tmp_path / "05-dpo" / "adapter" / "adapter_config.json").is_file()


def test_batched_generation_on_the_gpu(sft_out: Path) -> None:
    from mathwizard.generation import Request, SamplingParams, load_generator
    from tests.training.builders import png

    generator = load_generator(sft_out, backend="unsloth", batch_size=3)
    assert next(generator.model.parameters()).device.type == "cuda"
    requests = [Request(text=f"Find angle {c}.", image=png(i), system="Answer briefly.") for i, c in enumerate("ABC")]
    completions = generator(requests, SamplingParams(max_new_tokens=8))
    assert len(completions) == 3 and generator.generate_calls == 1  # one left-padded batch, not three calls
    assert all(1 <= c.tokens <= 8 for c in completions)


COMPILED_CHECK = """
import sys, torch._dynamo
from mathwizard.generation import ModelGenerator, Request, SamplingParams, load_generator
from tests.training.builders import png
compiled = load_generator(sys.argv[1], backend="hf", dtype="float32", batch_size=3, decode="compiled")
assert compiled.decode == "compiled" and compiled.model.device.type == "cuda"
eager = ModelGenerator(model=compiled.model, processor=compiled.processor, batch_size=3, decode="eager")
texts = [f"Find angle {c}. " * (i + 1) for i, c in enumerate("ABC")]
requests = [Request(text=t, image=png(i), system="Be brief.") for i, t in enumerate(texts)]
params = SamplingParams(max_new_tokens=12)
assert compiled(requests, params) == eager(requests, params), "compiled answers differ"
graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
assert graphs >= 1, "nothing compiled"
assert compiled(requests[:2], SamplingParams(20)) == eager(requests[:2], SamplingParams(20)), "2nd call differs"
assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs, "the 2nd call compiled again"
print("compiled decoding ok", graphs)
"""


def test_compiled_decoding_on_the_gpu_answers_like_eager_and_compiles_once(sft_out: Path) -> None:
    """model.decode=compiled on CUDA with the hf backend: static cache + CUDA graphs give the same greedy answers as
    eager decoding (float32, so kernel choice cannot flip a near tie), and a second call with other prompts and a
    short batch compiles nothing. In its own process: Unsloth, imported here by the other tests, patches
    transformers' gemma-3n globally."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(
        [sys.executable, "-c", COMPILED_CHECK, str(sft_out)], env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "compiled decoding ok" in done.stdout
