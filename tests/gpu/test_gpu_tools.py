"""CPU checks of the GPU tooling: the compile switch, the benchmarks' arithmetic, the recipe and the run script."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks" / "gpu"))


@pytest.fixture
def fresh_compile(monkeypatch: pytest.MonkeyPatch):
    from mathwizard.models import backend

    for name in ("UNSLOTH_COMPILE_DISABLE", "UNSLOTH_BLOCK_COMPILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(backend, "_compile_mode", None)
    return backend


def test_compile_modes_set_unsloths_switches(fresh_compile, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    fresh_compile.configure_compile("eager")
    assert (os.environ["UNSLOTH_COMPILE_DISABLE"], os.environ["UNSLOTH_BLOCK_COMPILE"]) == ("1", "0")
    fresh_compile.configure_compile("modules")
    assert "UNSLOTH_COMPILE_DISABLE" not in os.environ and os.environ["UNSLOTH_BLOCK_COMPILE"] == "0"
    fresh_compile.configure_compile("unsloth")
    assert "UNSLOTH_COMPILE_DISABLE" not in os.environ and "UNSLOTH_BLOCK_COMPILE" not in os.environ


def test_an_unknown_compile_mode_is_a_config_error(fresh_compile) -> None:
    from mathwizard.errors import ConfigError

    with pytest.raises(ConfigError, match=r"model\.compile must be one of eager, modules, unsloth"):
        fresh_compile.configure_compile("off")


def test_compile_setting_is_validated_and_defaults_to_eager() -> None:
    from pydantic import ValidationError

    from mathwizard.config import ModelConfig

    assert ModelConfig().compile == "eager"
    with pytest.raises(ValidationError):
        ModelConfig(compile=False)  # what YAML makes of an unquoted `off`


def test_the_hf_path_leaves_unsloths_switches_alone(fresh_compile) -> None:
    import os

    fresh_compile.activate("hf")
    assert "UNSLOTH_COMPILE_DISABLE" not in os.environ and fresh_compile._compile_mode is None


def test_model_ref_carries_the_compile_setting_but_not_into_fingerprints() -> None:
    from mathwizard.config import ModelConfig
    from mathwizard.generation import model_ref

    eager, full = model_ref(ModelConfig(compile="eager")), model_ref(ModelConfig(compile="unsloth"))
    assert (eager.compile, full.compile) == ("eager", "unsloth")
    assert eager.identity() == full.identity()  # how it runs, not what it answers


def test_throughput_counts_only_the_timed_steps() -> None:
    from _train import summarize

    steps = [
        {"seconds": 10.0, "tokens": 1000, "padded": 1000, "seq": [500]},  # warm-up: compiles
        {"seconds": 2.0, "tokens": 1000, "padded": 1200, "seq": [600]},
        {"seconds": 2.0, "tokens": 1000, "padded": 1200, "seq": [600]},
        {"seconds": 4.0, "tokens": 2000, "padded": 2400, "seq": [600]},
    ]
    s = summarize({"steps": steps}, warmup=1)
    assert s["tokens_per_s"] == 4000 / 8  # 1000 + 1000 + 2000 tokens in 2 + 2 + 4 s
    assert s["padding_share"] == pytest.approx(1 - 4000 / 4800)
    assert s["step_s_median"] == 2.0
    assert s["compile_s_estimate"] == 10.0 - 2.0  # the warm-up step minus one steady step
    assert s["sequence_lengths"] == [500, 600]


def test_a_variant_stopped_before_its_timed_steps_reports_no_throughput() -> None:
    from _train import summarize

    s = summarize({"steps": [{"seconds": 150.0, "tokens": 10, "padded": 10, "seq": [5]}]}, warmup=3)
    assert s == {"steps_done": 1, "first_step_s": 150.0}


def test_decode_bound_counts_the_weights_a_decode_step_reads(tmp_path: Path, monkeypatch) -> None:
    import torch
    from bench_generation import decode_weight_bytes

    from mathwizard.models import load_model

    monkeypatch.setenv("MATHWIZARD_MODELS_DIR", str(tmp_path))
    torch.set_num_threads(1)
    model, _ = load_model("tiny", "hf", for_training=False)
    skipped = ("vision_tower", "audio_tower", "embed_vision", "embed_audio", "embed_tokens_per_layer")
    expected = sum(
        p.numel() * p.element_size() for n, p in model.named_parameters() if not any(s in n for s in skipped)
    )  # named_parameters() lists a tied lm_head/embed_tokens matrix once
    assert decode_weight_bytes(model) == expected
    assert 0 < expected < sum(p.numel() * p.element_size() for p in model.parameters())


def test_the_e2e_recipe_loads() -> None:
    from mathwizard.config import load_settings

    s = load_settings(REPO / "benchmarks" / "gpu" / "e2b-unsloth.yaml")
    assert (s.model.backend, s.model.compile, s.model.dtype) == ("unsloth", "eager", "bfloat16")
    assert s.eval.models == ["dpo"]


def test_the_gpu_scripts_parse() -> None:
    for script in ("run_all.sh", "pack.sh"):
        done = subprocess.run(["bash", "-n", str(REPO / "benchmarks" / "gpu" / script)], capture_output=True)
        assert done.returncode == 0, done.stderr.decode()


def test_undo_timm_compile_restores_the_forwards_unsloth_compiled(monkeypatch: pytest.MonkeyPatch) -> None:
    import timm.layers.norm_act as norm_act
    import timm.models._efficientnet_blocks as blocks
    import torch

    from mathwizard.models.backend import undo_timm_compile

    # What unsloth_zoo's compile_timm_models does to every such class when FastVisionModel loads a model.
    originals = {cls: cls.__dict__["forward"] for cls in (norm_act.BatchNormAct2d, blocks.UniversalInvertedResidual)}
    for cls, forward in originals.items():
        monkeypatch.setattr(cls, "forward", torch.compile(forward, fullgraph=True, dynamic=None))
    restored = undo_timm_compile()
    assert {"timm.layers.norm_act.BatchNormAct2d", "timm.models._efficientnet_blocks.UniversalInvertedResidual"} <= set(
        restored
    )
    assert all(cls.__dict__["forward"] is forward for cls, forward in originals.items())
    assert undo_timm_compile() == []  # nothing compiled is left
