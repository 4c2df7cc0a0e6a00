"""`model.compile: layers` on the tiny model: which modules are compiled, and SFT and DPO train with them to the eager
losses. Dynamo and AOTAutograd run for real, forward and backward, with the "aot_eager" backend: Inductor's C++ code
for the tiny model takes over a minute on a 2-core CPU (a `slow` test runs it)."""

from __future__ import annotations

import logging
import math
import threading
from pathlib import Path

import pytest

from mathwizard.config import DPOConfig, LoRAConfig, ModelConfig, SFTConfig
from mathwizard.models import backend as backends
from tests.training.builders import pairs_folder, teach_folder

# LoRA dropout off: a compiled graph may draw its random masks differently from eager, which is not what is compared.
NO_DROPOUT = LoRAConfig(dropout=0.0)
TRAIN = dict(
    max_steps=2,
    per_device_train_batch_size=2,
    gradient_accumulation_steps=1,
    save_steps=50,
    max_length=512,
    warmup_steps=0,
    learning_rate=1e-3,
    eval_steps=None,
    lora=NO_DROPOUT,
)  # gradient checkpointing (on by default) is chosen per test


def _compiled(model) -> list[str]:
    return [name for name, m in model.named_modules() if getattr(m, "_compiled_call_impl", None) is not None]


def _losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def test_the_decoder_layers_are_compiled_in_place_and_the_towers_stay_eager(caplog: pytest.LogCaptureFixture) -> None:
    import torch

    from mathwizard.models import load_model

    base, _ = load_model("tiny", "hf", for_training=True)
    model = backends.add_lora(base, NO_DROPOUT, "hf", seed=0, gradient_checkpointing=False)
    assert backends.compile_for_training(model, "eager") == 0 and _compiled(model) == []

    with caplog.at_level(logging.INFO, logger=backends.__name__):
        count = backends.compile_for_training(model, "layers")
    layers = base.config.get_text_config().num_hidden_layers
    assert count == layers == 2  # the tiny model's text layers (one sliding, one full attention)
    compiled = _compiled(model)
    assert len(compiled) == layers
    assert all(".language_model.layers." in name for name in compiled)  # never the vision or audio tower
    assert not any(getattr(m, "_compiled_call_impl", None) for m in base.model.vision_tower.modules())
    assert f"{layers} decoder layers (Gemma3nTextDecoderLayer) compiled" in caplog.text
    state = set(model.state_dict())
    assert not any("_orig_mod" in key for key in state)  # checkpoints and adapters keep their eager names

    calls = [m._compiled_call_impl for name, m in model.named_modules() if name in compiled]
    assert backends.compile_decoder_layers(model) == compiled  # a second call compiles nothing again
    assert [m._compiled_call_impl for name, m in model.named_modules() if name in compiled] == calls

    # dynamo may keep a graph per kind of layer, grad mode and shape, in every thread (autograd's too)
    seen: dict[str, int] = {}
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    worker = threading.Thread(target=lambda: seen.update(limit=getattr(config, name)))
    worker.start()
    worker.join()
    assert getattr(config, name) >= backends.RECOMPILE_LIMIT and seen["limit"] >= backends.RECOMPILE_LIMIT

    with caplog.at_level(logging.WARNING, logger=backends.__name__):
        assert backends.compile_decoder_layers(torch.nn.Linear(2, 2)) == []
    assert "no *TextDecoderLayer module in this model; it trains eagerly" in caplog.text


@pytest.mark.parametrize(
    ("backend", "checkpointing"),
    [
        ("aot_eager", False),
        # a checkpointed layer's forward is recomputed in the backward: graphs for that call too
        pytest.param("aot_eager", True, marks=pytest.mark.slow),
        # the real backend: Inductor's C++ code for the tiny model's layers, forward and backward (over a minute)
        pytest.param("inductor", False, marks=pytest.mark.slow),
    ],
)
def test_sft_with_compiled_layers_trains_to_the_eager_losses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backend: str, checkpointing: bool
) -> None:
    from mathwizard.stages import sft

    monkeypatch.setattr(backends, "LAYER_COMPILE_BACKEND", backend)
    teach = teach_folder(tmp_path / "02-teach", n_train=2, n_val=0)  # both steps see one shape: no recompiling
    cfg = SFTConfig(**TRAIN, gradient_checkpointing=checkpointing)
    eager, _ = sft.build_trainer(cfg, ModelConfig(), teach, tmp_path / "eager")
    assert _compiled(eager.model) == []
    eager.train()

    trainer, _ = sft.build_trainer(cfg, ModelConfig(compile="layers"), teach, tmp_path / "layers")
    assert len(_compiled(trainer.model)) == 2
    graphs = _graphs()
    trainer.train()
    assert _graphs() > graphs  # dynamo really captured the layers (no silent fallback to eager)
    losses = _losses(trainer)
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    # the first batch's loss, and the next step's (after an optimizer step on the compiled backward's gradients);
    # Inductor's fused kernels sum in another order
    assert losses == pytest.approx(_losses(eager), rel=1e-3 if backend == "inductor" else 1e-4)


def test_dpo_compiles_the_layers_of_the_model_trl_wrapped(tmp_path: Path) -> None:
    from mathwizard.stages import dpo

    pairs = pairs_folder(tmp_path / "04-pairs", n_train=2, n_val=0)
    cfg = DPOConfig(**TRAIN, gradient_checkpointing=False)
    trainer, _ = dpo.build_trainer(cfg, ModelConfig(compile="layers"), None, pairs, tmp_path / "out")
    # TRL wraps the model in PEFT itself on the hf path: its layers serve the policy and, adapter off, the reference
    assert len(_compiled(trainer.model)) == 2 and trainer.ref_model is None


@pytest.mark.slow
def test_dpo_with_compiled_layers_trains_to_the_eager_losses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mathwizard.stages import dpo

    monkeypatch.setattr(backends, "LAYER_COMPILE_BACKEND", "aot_eager")
    pairs = pairs_folder(tmp_path / "04-pairs", n_train=2, n_val=0)
    cfg = DPOConfig(**TRAIN, gradient_checkpointing=False)
    eager, _ = dpo.build_trainer(cfg, ModelConfig(), None, pairs, tmp_path / "eager")
    eager.train()

    trainer, _ = dpo.build_trainer(cfg, ModelConfig(compile="layers"), None, pairs, tmp_path / "layers")
    graphs = _graphs()
    trainer.train()  # the policy's forward and backward, the reference's (adapter off) under no_grad
    assert _graphs() > graphs
    losses = _losses(trainer)
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    assert losses == pytest.approx(_losses(eager), rel=1e-4)
