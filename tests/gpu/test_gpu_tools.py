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
    fresh_compile.configure_compile("layers")  # Unsloth compiles nothing; the stages compile the decoder layers
    assert (os.environ["UNSLOTH_COMPILE_DISABLE"], os.environ["UNSLOTH_BLOCK_COMPILE"]) == ("1", "0")


def test_eager_and_layers_share_a_process_after_unsloth_is_imported(
    fresh_compile, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import os
    import types

    fresh_compile.configure_compile("eager")
    monkeypatch.setitem(sys.modules, "unsloth", types.ModuleType("unsloth"))  # as if imported with those switches
    with caplog.at_level("WARNING", logger=fresh_compile.__name__):
        fresh_compile.configure_compile("layers")
    assert caplog.text == "" and fresh_compile._compile_mode == "layers"
    with caplog.at_level("WARNING", logger=fresh_compile.__name__):
        fresh_compile.configure_compile("modules")  # another Unsloth setting: too late in this process
    assert "unsloth was imported with model.compile=layers; modules applies in a new process only" in caplog.text
    assert os.environ["UNSLOTH_COMPILE_DISABLE"] == "1" and fresh_compile._compile_mode == "layers"


def test_an_unknown_compile_mode_is_a_config_error(fresh_compile) -> None:
    from mathwizard.errors import ConfigError

    with pytest.raises(ConfigError, match=r"model\.compile must be one of eager, modules, unsloth, layers, got 'off'"):
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


def test_the_compile_setting_stays_out_of_fingerprints() -> None:
    from mathwizard.config import ModelConfig
    from mathwizard.models.ref import resolve

    tiny = resolve("tiny")  # how Unsloth compiles changes how fast a model runs, not what it answers
    assert tiny.identity(ModelConfig(compile="eager")) == tiny.identity(ModelConfig(compile="unsloth"))
    assert tiny.identity(ModelConfig(compile="eager")) == tiny.identity(ModelConfig(compile="layers"))


def test_throughput_counts_only_the_timed_steps() -> None:
    from _train import summarize

    steps = [
        {"seconds": 10.0, "tokens": 1000, "padded": 1000},  # warm-up: allocator growth, autotuning
        {"seconds": 2.0, "tokens": 1000, "padded": 1200},
        {"seconds": 2.0, "tokens": 1000, "padded": 1200},
        {"seconds": 4.0, "tokens": 2000, "padded": 2400},
    ]
    s = summarize({"steps": steps}, warmup=1)
    assert s["tokens_per_s"] == 4000 / 8  # 1000 + 1000 + 2000 tokens in 2 + 2 + 4 s
    assert s["padding_share"] == pytest.approx(1 - 4000 / 4800)
    assert (s["step_s"]["median"], s["step_s"]["min"], s["step_s"]["max"], s["step_s"]["n"]) == (2.0, 2.0, 4.0, 3)
    assert s["warmup_extra_s"] == 10.0 - 2.0  # the warm-up step minus one steady step


def test_a_variant_stopped_before_its_timed_steps_reports_no_throughput() -> None:
    from _train import summarize

    s = summarize({"steps": [{"seconds": 150.0, "tokens": 10, "padded": 10}]}, warmup=3)
    assert s == {"steps_done": 1, "timed_steps": 0}


def test_a_run_stopped_before_its_summary_is_summarized_from_its_step_files(tmp_path: Path) -> None:
    """`--summarize DIR`: the parent's table and JSON from the worker files a timed-out run left, nothing run."""
    import json

    steps = [{"seconds": s, "tokens": 1000, "padded": 1100, "loss": None} for s in (9.0, 2.0, 1.0, 2.0)]
    variants = {
        "unsloth:8x4:k=none": {"kind": "unsloth", "micro": 8, "accum": 4, "steps": steps, "done": True},
        "unsloth:8x4": {"kind": "unsloth", "micro": 8, "accum": 4, "steps": [steps[0], {**steps[1], "seconds": 1.0}]},
    }
    (tmp_path / "sft-unsloth.json").write_text(json.dumps({"import_s": 30.0, "variants": variants}))
    out = tmp_path / "sft.json"
    command = [sys.executable, str(REPO / "benchmarks/gpu/bench_sft.py"), "--summarize", str(tmp_path)]
    command += ["--variants", "unsloth:8x4:k=none,unsloth:8x4", "--warmup", "1", "--json", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    baseline, kernels = (report["variants"][n]["summary"] for n in ("unsloth:8x4:k=none", "unsloth:8x4"))
    assert baseline["tokens_per_s"] == 3000 / 5.0 and kernels["tokens_per_s"] == 1000 / 1.0
    assert kernels["vs_baseline"] == pytest.approx(1000 / 600)
    assert "sft unsloth:8x4: 1,000 tokens/s vs 600 baseline (unsloth:8x4:k=none) -> 1.67x" in done.stdout
    assert "unfinished" in done.stdout  # the second variant never set `done`


def test_variants_name_backend_micro_batch_accumulation_checkpointing_and_compilation() -> None:
    from _train import parse_variant

    from mathwizard.models.kernels import KERNELS

    all_kernels = list(KERNELS)
    expected = {
        "name": "hf:8x4:gc",
        "kind": "hf",
        "micro": 8,
        "accum": 4,
        "gc": True,
        "compile": False,
        "fresh": False,
        "kernels": all_kernels,  # the setting's default
    }
    assert parse_variant("hf:8x4:gc") == expected
    assert parse_variant("unsloth:8x4:k=none")["kernels"] == []  # gemma-3n's own code
    assert parse_variant("unsloth:8x4:gc:k=rms_norm+sdpa")["kernels"] == ["rms_norm", "sdpa"]
    assert parse_variant("plain:16x2")["gc"] is False
    assert parse_variant("unsloth:8x4:compile") == {
        "name": "unsloth:8x4:compile",
        "kind": "unsloth",
        "micro": 8,
        "accum": 4,
        "gc": False,
        "compile": True,  # built with model.compile: layers
        "fresh": False,
        "kernels": all_kernels,
    }
    assert parse_variant("unsloth:4x2:fresh")["fresh"] is True  # vision_cache emptied before every step
    both = parse_variant("hf:8x4:gc:compile")
    assert (both["kind"], both["micro"], both["accum"], both["gc"], both["compile"]) == ("hf", 8, 4, True, True)
    assert parse_variant("plain:8x4:compile")["compile"] is True  # the baseline loop on the compiled layers
    for bad in ("fast:8x4", "hf:8x4:compiled", "unsloth:8x4:gc:fast", "unsloth:8x4:k=flash"):
        with pytest.raises(SystemExit, match=r"bad variant .*\[:gc\]\[:compile\]"):
            parse_variant(bad)


def test_the_projection_takes_the_recipes_own_settings_from_the_measurements() -> None:
    from projection import project

    from mathwizard.config import load_settings

    settings = load_settings(REPO / "deployments" / "recipes" / "gemma-3n-e2b.yaml")
    backend = "unsloth" if settings.model.backend in ("auto", "unsloth") else "hf"

    def name(cfg) -> str:
        shape = f"{cfg.per_device_train_batch_size}x{cfg.gradient_accumulation_steps}"
        return f"{backend}:{shape}" + (":gc" if cfg.gradient_checkpointing else "")

    assert "vision_cache" in settings.model.kernels  # per stage: the first epoch and DPO take the `:fresh` figures
    sft = {
        "variants": {
            name(settings.sft): {"first_step_s": 60, "summary": {"tokens_per_s": 10_000}},
            name(settings.sft) + ":fresh": {"first_step_s": 61, "summary": {"tokens_per_s": 8_000}},
        }
    }
    dpo_step = {"tokens_per_s": 1, "step_s": {"median": 2}}
    dpo = {
        "variants": {
            name(settings.dpo): {"first_step_s": 69, "summary": {**dpo_step, "step_s": {"median": 1}}},
            name(settings.dpo) + ":fresh": {"first_step_s": 70, "summary": dpo_step},
        }
    }
    sampling = {"max_new_tokens": 1024, "steady_tokens_per_s": 20_000, "step_ms": {"median": 50.0}}
    sampling.update(requests=1000, seconds=1024 * 0.05 + 10)  # 10 s outside the decode steps: 10 ms a request
    evaluation = {"max_new_tokens": 1024, "step_ms": {"median": 40.0}, "requests": 500, "seconds": 1024 * 0.04 + 5}
    gen = {
        "start_to_loaded_s": 30,
        "load_s": 12,
        "sampling": {"candidate": sampling},
        "eval": {"candidate": evaluation},
    }
    result = project(sft, dpo, gen, settings, "per-stage")
    rows = settings.sft.per_device_train_batch_size * settings.sft.gradient_accumulation_steps  # 32
    tokens = settings.sft.max_steps * rows * 650
    assert tokens > 5_300 * 650  # more than one epoch: the first at the fresh rate, the rest cached
    assert result["stages"]["sft"]["run_s"] == pytest.approx(5_300 * 650 / 8_000 + (tokens - 5_300 * 650) / 10_000)
    pairs_s = 5_300 * settings.pairs.max_new_tokens / 20_000 + 5_300 * 0.01
    assert result["stages"]["pairs"]["run_s"] == pytest.approx(pairs_s)
    assert result["stages"]["dpo"]["total_s"] == 70 + settings.dpo.max_steps * 2  # every pair new: fresh
    eval_s = 3 * 30 + 3 * (settings.eval.max_new_tokens * 0.04 + 300 * 0.01)
    assert result["stages"]["eval"]["total_s"] == pytest.approx(eval_s)
    assert result["total_s"] == sum(s["total_s"] for s in result["stages"].values())
    uncached = settings.model_copy(update={"model": settings.model.model_copy(update={"kernels": []})})
    assert project(sft, dpo, gen, uncached, "per-stage")["stages"]["sft"]["run_s"] == tokens / 10_000

    # One process (mathwizard run): imports once, the later stages find SFT's figures.
    dpo["variants"][name(settings.dpo)]["import_s"] = 30
    known = {"figures": "known", "seconds": 1024 * 0.05 + 4}  # 4 ms a request outside the decode steps
    gen["sampling"]["candidate_figures_known"] = {**sampling, **known}
    gen["eval"]["candidate_figures_known"] = {**evaluation, "seconds": 1024 * 0.04 + 1}  # 2 ms a request
    one = project(sft, dpo, gen, settings)
    assert one["layout"] == "one-process" and one["stages"]["sft"]["start_s"] == 60  # SFT pays the imports
    assert one["stages"]["sft"]["run_s"] == result["stages"]["sft"]["run_s"]
    assert one["stages"]["pairs"]["start_s"] == 12 and one["stages"]["pairs"]["figures"] == "known"
    assert one["stages"]["pairs"]["run_s"] == pytest.approx(
        5_300 * settings.pairs.max_new_tokens / 20_000 + 5_300 * 0.004
    )
    assert one["stages"]["dpo"]["total_s"] == 69 - 30 + settings.dpo.max_steps * 1  # SFT computed every figure
    per_model = settings.eval.max_new_tokens * 0.04
    eval_s = 3 * 12 + 3 * per_model + 300 * 0.01 + 2 * 300 * 0.002  # the base model's run computes the test figures
    assert one["stages"]["eval"]["total_s"] == pytest.approx(eval_s)
    apart = project(sft, dpo, gen, settings, "per-stage")["stages"]  # nothing shared: as before
    assert apart["sft"] == result["stages"]["sft"] and apart["pairs"] == result["stages"]["pairs"]
    assert apart["dpo"] == result["stages"]["dpo"] and apart["eval"] == result["stages"]["eval"]

    # One process whose later loads do not find SFT's figures: one process's start-ups, every figure new.
    dpo["variants"][name(settings.dpo) + ":fresh"]["import_s"] = 30
    own = project(sft, dpo, gen, settings, "one-process", "own")["stages"]
    assert own["pairs"]["run_s"] == result["stages"]["pairs"]["run_s"] and own["pairs"]["start_s"] == 12
    assert own["dpo"]["total_s"] == 70 - 30 + settings.dpo.max_steps * 2  # every pair new, the imports paid
    assert own["eval"]["run_s"] == pytest.approx(result["stages"]["eval"]["run_s"])
    assert own["sft"] == one["stages"]["sft"]
    del sft["variants"][name(settings.sft) + ":fresh"]
    with pytest.raises(SystemExit, match="were not measured"):
        project(sft, dpo, gen, settings)  # the recipe caches figures: its first epoch must be measured too
    with pytest.raises(SystemExit, match="were not measured"):
        project({"variants": {}}, dpo, gen, settings)


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
    assert s.model.decode == "auto"  # graphs on the GPU
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


def test_the_hf_lora_targets_are_the_language_models_attention_and_mlp_projections(tmp_path_factory) -> None:
    """Not the audio tower, not the audio/vision embedders' projections, not AltUp/Laurel/per-layer projections: the
    same list that Unsloth is handed (tests/gpu/test_gpu_path.py checks that Unsloth adapts exactly these)."""
    from mathwizard.config import LoRAConfig
    from mathwizard.models import load_model
    from mathwizard.models.backend import lora_target_modules
    from tests.training.builders import use_session_model_cache

    use_session_model_cache(tmp_path_factory)
    model, _ = load_model("tiny", "hf", for_training=True)
    projections = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
    projections += ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    expected = [f"model.language_model.layers.{i}.{p}" for i in range(2) for p in projections]  # tiny: 2 layers
    assert lora_target_modules(model, LoRAConfig()) == expected
    assert lora_target_modules(model, LoRAConfig(finetune_mlp_modules=False)) == [
        n for n in expected if "self_attn" in n
    ]


def test_the_sft_trainers_loss_is_the_plain_forward_loss_on_the_same_batch(tmp_path_factory) -> None:
    """The project's SFT trainer (TRL's tiled LM head: no full-vocabulary logits) against the model's own forward with
    labels (full logits, transformers' cross-entropy) on one batch: the same number."""
    import torch

    from mathwizard.config import ModelConfig, SFTConfig
    from mathwizard.stages.sft import build_trainer
    from tests.training.builders import teach_folder, use_session_model_cache

    use_session_model_cache(tmp_path_factory)
    root = tmp_path_factory.mktemp("loss")
    teach = teach_folder(root / "02-teach", n_train=4, n_val=0)
    cfg = SFTConfig(max_steps=1, per_device_train_batch_size=4, gradient_accumulation_steps=1, max_length=512)
    trainer, _ = build_trainer(cfg, ModelConfig(name="tiny", backend="hf"), teach, root / "03-sft")
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    model = trainer.model
    model.eval()  # no LoRA dropout: both passes see the same weights
    with torch.no_grad():
        fused = trainer.compute_loss(model, dict(batch))
        plain = model(**{k: v for k, v in batch.items()}, use_cache=False).loss
    assert (batch["labels"] == -100).any() and (batch["labels"] != -100).any()  # loss on the answer only
    assert torch.allclose(fused, plain, rtol=1e-5), (fused.item(), plain.item())


def test_every_benchmark_step_trains_the_variants_full_rows_each_row_once(tmp_path_factory) -> None:
    """The sample ends an epoch every other step and the trainer's last step of an epoch is short (SFT: 19 of 32
    rows); `fill_every_step` repeats the rows in order so that every step has micro x accum distinct rows, as in a
    5,300-row MM_Math epoch, and the plain loop (cycling the same loader) trains the same steps."""
    import itertools

    from _train import batch_tokens, fill_every_step

    from mathwizard.config import ModelConfig, SFTConfig
    from mathwizard.stages.sft import build_trainer
    from tests.training.builders import teach_folder, use_session_model_cache

    use_session_model_cache(tmp_path_factory)
    root = tmp_path_factory.mktemp("full-steps")
    teach = teach_folder(root / "02-teach", n_train=5, n_val=0)
    cfg = SFTConfig(max_steps=3, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_length=512)
    trainer, _ = build_trainer(cfg, ModelConfig(name="tiny", backend="hf"), teach, root / "03-sft")
    rows_of = lambda dataset: [str(row["prompt"]) + str(row["completion"]) for row in dataset]  # noqa: E731
    original = rows_of(trainer.train_dataset)
    assert len(set(original)) == 5
    # 5 rows and a step of 4: the trainer's second step would take the epoch's last row only

    assert fill_every_step(trainer, rows=4, steps=3) == 15  # 12 rows needed: the 5 rows three times
    micro = list(itertools.islice(trainer.get_train_dataloader(), 6))
    assert [batch_tokens(batch)[2] for batch in micro] == [2] * 6  # every micro-batch full: every step 4 rows
    order = rows_of(trainer.train_dataset)
    assert order == original * 3  # the rows repeated in order, and read in order (not shuffled):
    assert list(trainer._get_train_sampler()) == list(range(15))
    for step in range(3):  # no row twice within a step: a `fresh` step's figures are all new
        assert len(set(order[4 * step : 4 * step + 4])) == 4


def test_the_flop_count_goes_through_eager_attention_and_gives_the_model_its_attention_back(tmp_path_factory) -> None:
    """MFU's FLOPs: counted through eager attention (on the H200 torch's counter asserted on SDPA with shared KV
    heads, which `model.kernels` uses, and both hf variants failed before their first step), the same count as the
    model without the kernels, and the model keeps its attention for the timed steps."""
    from _train import count_forward_flops

    from mathwizard.config import ModelConfig, SFTConfig
    from mathwizard.models.kernels import SDPA
    from mathwizard.stages.sft import build_trainer
    from tests.training.builders import teach_folder, use_session_model_cache

    use_session_model_cache(tmp_path_factory)
    root = tmp_path_factory.mktemp("flops")
    teach = teach_folder(root / "02-teach", n_train=2, n_val=0)
    cfg = SFTConfig(max_steps=1, per_device_train_batch_size=2, max_length=512, eval_steps=None)
    counts, attentions = [], []
    for kernels in (["sdpa"], []):
        trainer, _ = build_trainer(cfg, ModelConfig(name="tiny", backend="hf", kernels=kernels), teach, root / "sft")
        attentions.append(trainer.model.config.text_config._attn_implementation)
        counts.append(count_forward_flops(trainer)["forward_flops"])
        assert trainer.model.config.text_config._attn_implementation == attentions[-1]
    assert attentions[0] == SDPA != attentions[1] and counts[0] == counts[1] > 0


def test_the_profile_gives_each_operator_to_its_module_forward_and_backward() -> None:
    """`--profile`'s module table: the decoder layers' modules add up across layers, a backward operator counts for
    the module whose forward made it, no operator's time is lost, and AltUp's methods are labelled and put back."""
    import types

    import torch
    from _profile import BACKWARD, labelled_modules, module_label, time_by_module
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    class Gemma3nTextAltUp(torch.nn.Module):  # the method-only module the labels wrap
        def predict(self, x: torch.Tensor) -> torch.Tensor:
            return x * 2

    class Layer(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mlp, self.altup = torch.nn.Linear(64, 64), Gemma3nTextAltUp()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.tanh(self.mlp(self.altup.predict(x))) + x

    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList([Layer(), Layer()])
    patched = types.MethodType(lambda self, x: x * 3, model.layers[1].altup)  # as model.kernels patches AltUp
    model.layers[1].altup.predict = patched
    x = torch.randn(32, 64, requires_grad=True)
    with labelled_modules(model), profile(activities=[ProfilerActivity.CPU]) as prof:
        y = x
        for layer in model.layers:
            y = layer(y)
        y.sum().backward()
    assert model.layers[1].altup.predict is patched and "predict" not in vars(model.layers[0].altup)
    assert module_label("base_model.model.model.language_model.layers.7.mlp.up_proj.lora_A.default") == (
        "layer.mlp.up_proj.lora_A"
    )
    # a kernel's own (device-side) event repeats its operator's time: on the H200 it doubled the total once
    kernel = types.SimpleNamespace(name="gemm", device_type=DeviceType.CUDA, cpu_parent=None, sequence_nr=-1)
    kernel.time_range = types.SimpleNamespace(start=0)
    kernel.self_device_time_total = kernel.self_cpu_time_total = 1e9
    totals = time_by_module([*prof.events(), kernel], on_device=False)
    for label in ("layer.mlp", "layer.altup.predict", "layer"):
        assert totals.get(label, 0) > 0 and totals.get(label + BACKWARD, 0) > 0, (label, totals)
    own = sum(e.self_cpu_time_total for e in prof.events() if not e.name.startswith("mw:"))
    assert sum(totals.values()) == pytest.approx(own)


def test_bench_vision_reports_a_loaded_towers_dtypes_and_gives_each_variant_the_tower_as_loaded() -> None:
    """`bench_vision.py --load`: the tower as a backend left it (here: bf16 with float32 norms, as Unsloth leaves
    gemma-3n's) is reported, a `uniform` variant runs it cast to bf16, and the next variant gets it back as loaded."""
    import torch
    from bench_vision import dtype_summary, loaded_tower, time_variant

    tower = loaded_tower(Path("tiny"), "hf").to(torch.bfloat16)
    norms = [m.weight for m in tower.modules() if "RmsNorm" in type(m).__name__]
    for weight in norms:
        weight.data = weight.data.float()
    summary = dtype_summary(tower)
    assert summary["torch.float32"]["tensors"] == len(norms) > 0
    assert set(summary["torch.float32"]["modules"]) <= {"RmsNorm2d", "RmsNormAct2d"}
    as_loaded = {name: p.dtype for name, p in tower.named_parameters()}

    result = time_variant(tower, 1, "folded+uniform", 0, 1, None, size=64)
    assert result["ms"]["n"] == 1 and result["out"].isfinite().all()
    assert {name: p.dtype for name, p in tower.named_parameters()} == as_loaded
