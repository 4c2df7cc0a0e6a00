"""The Unsloth path on a CUDA machine: SFT, DPO and batched generation through the stages, on the tiny gemma-3n.

Marked `gpu` (CI deselects the marker and has no GPU anyway); skipped cleanly where CUDA or Unsloth is missing.
Run on the GPU machine with Unsloth imported before anything imports transformers (tests/gpu/unsloth_first.py):
`python -m pytest -p tests.gpu.unsloth_first -m gpu tests/gpu` (a few minutes, most of it `import unsloth`).
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


def test_unsloth_was_imported_before_transformers() -> None:
    from tests.gpu import unsloth_first

    assert unsloth_first.IMPORTED_FIRST, "run with -p tests.gpu.unsloth_first (Unsloth patches transformers at import)"


def test_both_backends_adapt_the_same_modules(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Unsloth's own "all-linear" selection would add the audio tower and the embedders' projections."""
    from mathwizard.config import LoRAConfig
    from mathwizard.models import backend, load_model
    from tests.training.builders import use_session_model_cache

    use_session_model_cache(tmp_path_factory)
    adapted = {}
    for name in ("hf", "unsloth"):
        model, _ = load_model("tiny", name, for_training=True, dtype="bfloat16")
        expected = backend.lora_target_modules(model, LoRAConfig())
        peft = backend.add_lora(model, LoRAConfig(), name, seed=0, gradient_checkpointing=False)
        adapted[name] = sorted(
            n.removeprefix("base_model.model.").removesuffix(".lora_A")
            for n, _ in peft.named_modules()
            if n.endswith(".lora_A")
        )
        assert adapted[name] == sorted(expected), name
    assert adapted["hf"] == adapted["unsloth"]


def test_the_trainers_loss_on_the_gpu_is_the_plain_forward_loss(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The SFT trainer at the recipe's GPU settings (no checkpointing, TRL's tiled LM head) against the model's own
    forward with labels, in bf16 on the same batch."""
    import torch

    from mathwizard.config import ModelConfig, SFTConfig
    from mathwizard.stages.sft import build_trainer
    from tests.training.builders import teach_folder, use_session_model_cache

    use_session_model_cache(tmp_path_factory)
    root = tmp_path_factory.mktemp("loss")
    teach = teach_folder(root / "02-teach", n_train=8, n_val=0)
    cfg = SFTConfig(
        max_steps=1,
        per_device_train_batch_size=8,
        gradient_accumulation_steps=1,
        max_length=512,
        gradient_checkpointing=False,
    )
    trainer, facts = build_trainer(cfg, ModelConfig(name="tiny", backend="hf", dtype="bfloat16"), teach, root / "sft")
    assert (facts["device"], facts["dtype"]) == ("cuda", "bfloat16")
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    trainer.model.eval()
    with torch.no_grad():
        fused = trainer.compute_loss(trainer.model, dict(batch)).float()
        plain = trainer.model(**batch, use_cache=False).loss.float()
    assert torch.allclose(fused, plain, rtol=2e-2), (fused.item(), plain.item())  # bf16: ~3 significant digits


def test_the_fused_kernels_give_the_models_own_loss_and_gradients_on_the_gpu(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """`model.kernels` on the Unsloth-loaded model at the recipe's settings (bf16, no checkpointing): the loss and
    every gradient of one batch with the fused RMSNorm, SDPA and the Triton AltUp mix are as close to gemma-3n's own
    code run in float32 as its own code run in bf16 is (flash-attention's test criterion: at most twice the bf16
    error, plus a little), and finite (no NaN from padded rows). Two bf16 runs alone cannot be compared tightly: the
    random model's gradients amplify rounding (one LoRA gradient differed by 5.3 % between them on the H200)."""
    import torch

    from mathwizard.config import ModelConfig, SFTConfig
    from mathwizard.models.kernels import SDPA, remove_kernels
    from mathwizard.stages.sft import build_trainer
    from tests.training.builders import teach_folder, use_session_model_cache

    use_session_model_cache(tmp_path_factory)
    root = tmp_path_factory.mktemp("kernels")
    teach = teach_folder(root / "02-teach", n_train=8, n_val=0)
    cfg = SFTConfig(max_steps=1, per_device_train_batch_size=8, max_length=512, gradient_checkpointing=False)
    model_cfg = ModelConfig(name="tiny", backend="unsloth", dtype="bfloat16", compile="eager")
    trainer, _ = build_trainer(cfg, model_cfg, teach, root / "sft")
    model = trainer.model
    assert model.config.text_config._attn_implementation == SDPA  # Unsloth loads gemma-3n eager; switched
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    assert (batch["attention_mask"] == 0).any()  # padded rows are part of it

    def loss_and_grads(dtype: torch.dtype) -> tuple:  # as a training step computes them (accelerate's autocast)
        model.zero_grad(set_to_none=True)
        inputs = dict(batch)
        if dtype == torch.float32:  # the reference: the whole model and its float inputs in float32, no autocast
            inputs = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in batch.items()}
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
        with autocast, trainer.compute_loss_context_manager():
            loss = trainer.compute_loss(model, inputs)
        loss.backward()
        grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
        return loss.detach().float(), grads

    fused_loss, fused = loss_and_grads(torch.bfloat16)
    remove_kernels(model)
    model.set_attn_implementation({"text_config": "eager"})
    own_loss, own = loss_and_grads(torch.bfloat16)
    model.float()
    exact_loss, exact = loss_and_grads(torch.float32)

    def error(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()

    assert torch.isfinite(fused_loss), fused_loss
    assert error(fused_loss, exact_loss) <= 2 * error(own_loss, exact_loss) + 1e-3, (fused_loss, own_loss, exact_loss)
    assert fused.keys() == own.keys() == exact.keys() and any(".lora_A" in n for n in own)
    assert all(torch.isfinite(g).all() for g in fused.values())
    errors = {n: (error(fused[n], g), error(own[n], g)) for n, g in exact.items()}
    worst = sorted(errors.items(), key=lambda item: item[1][0] - 2 * item[1][1], reverse=True)[:5]
    print("gradient error against float32 (fused, own bf16), worst five:", worst)
    assert all(f <= 2 * o + 0.02 for f, o in errors.values()), worst


def test_sft_trains_a_lora_adapter_with_unsloth_on_the_gpu(sft_out: Path) -> None:
    from safetensors.torch import load_file

    from mathwizard.manifest import read_manifest

    manifest = read_manifest(sft_out)
    assert manifest is not None
    report = manifest.report
    assert (report["backend"], report["device"], report["dtype"]) == ("unsloth", "cuda", "bfloat16")
    assert report["steps"] == 2  # max_steps
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
    assert (manifest.report["backend"], manifest.report["steps"]) == ("unsloth", 2)
    assert manifest.report["rewards_accuracies"] is not None  # DPO's own metrics were logged
    assert (tmp_path / "05-dpo" / "adapter" / "adapter_config.json").is_file()


def test_batched_generation_on_the_gpu(sft_out: Path) -> None:
    from mathwizard.generation import ModelGenerator, Request, SamplingParams, load_generator
    from tests.training.builders import png

    generator = load_generator(sft_out, backend="unsloth", batch_size=3, decode="auto")
    assert next(generator.model.parameters()).device.type == "cuda"
    assert generator.decode == "graphs"  # auto on CUDA
    requests = [Request(text=f"Find angle {c}.", image=png(i), system="Answer briefly.") for i, c in enumerate("ABC")]
    completions = generator(requests, SamplingParams(max_new_tokens=8))
    assert generator.decode == "graphs", "the row engine failed on the Unsloth-loaded model and fell back to eager"
    assert len(completions) == 3 and generator.generate_calls == 1  # one engine call, not three
    assert all(1 <= c.tokens <= 8 for c in completions)
    eager = ModelGenerator(model=generator.model, processor=generator.processor, batch_size=3, decode="eager")
    assert completions == eager(requests, SamplingParams(max_new_tokens=8))  # greedy: the same answers


def test_the_generation_load_of_the_sft_model_finds_the_figures_its_training_load_computed(
    sft_out: Path, model_cfg
) -> None:
    """`mathwizard run` in one process: SFT's Unsloth training load computes the figures, and pairs and eval load the
    SFT model merged and saved, through Unsloth for inference, and read them. That needs the same tower weights in
    the same dtype in both loads: Unsloth leaves the tower's norm weights float32, `uniform_dtype` gives both loads
    the checkpoint's bf16. Otherwise every later stage computes its figures again, with no error."""
    import torch

    from mathwizard.generation import to_pil
    from mathwizard.models import load_model
    from mathwizard.models.kernels import compute_figures, figure_cache, forget_figures
    from mathwizard.models.ref import resolve
    from tests.training.builders import png

    forget_figures()
    images = [to_pil(png(i)) for i in range(4)]
    trained, processor = load_model(model_cfg.name, "unsloth", for_training=True, kernels=model_cfg.kernels)
    assert {p.dtype for p in trained.model.vision_tower.parameters()} == {torch.bfloat16}
    trained.model.vision_tower.requires_grad_(False)  # as LoRA leaves it
    assert compute_figures(trained, processor, images) == len(images)
    generator = resolve(sft_out).generator(model_cfg, batch_size=4)
    assert {p.dtype for p in generator.model.model.vision_tower.parameters()} == {torch.bfloat16}
    assert figure_cache(generator.model) is figure_cache(trained) is not None
    assert compute_figures(generator.model, generator.processor, images) == 0
    forget_figures()


def test_the_row_engine_under_a_cuda_graph_answers_like_generate(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The row engine with its CUDA graph (float32, so kernel choice cannot flip a near tie) gives the greedy answers
    of transformers' generate, with 3 rows for 6 requests (rows refilled) and prompts past the sliding window."""
    from mathwizard import decoding
    from mathwizard.generation import ModelGenerator, Request, SamplingParams, _eos_ids, chat_messages
    from mathwizard.models import load_model
    from tests.training.builders import png, use_session_model_cache

    use_session_model_cache(tmp_path_factory)
    model, processor = load_model("tiny", "hf", for_training=False, dtype="float32")
    model.eval()
    texts = [f"Find angle {chr(65 + i)}. " * (9 * i + 1) for i in range(6)]
    requests = [Request(text=t, image=png(i), system="Be brief.") for i, t in enumerate(texts)]
    eager = ModelGenerator(model=model, processor=processor, batch_size=6, decode="eager")
    expected = [c.text for c in eager(requests, SamplingParams(max_new_tokens=40))]
    rendered = [
        processor.apply_chat_template(chat_messages(r), add_generation_prompt=True, tokenize=False) for r in requests
    ]
    decoding.prepare_model(model)
    engines = []
    tokens = decoding.decode_all(
        model,
        processor,
        rendered,
        [r.image for r in requests],
        max_new_tokens=40,
        temperature=0.0,
        top_p=1.0,
        top_k=None,
        seed=0,
        eos_ids=sorted(_eos_ids(model, processor)),
        graphs=True,
        rows=3,
        on_engine=engines.append,
    )
    assert engines[0].graph is not None  # the steps were graph replays
    assert [processor.tokenizer.decode(t, skip_special_tokens=True).strip() for t in tokens] == expected


def test_sampled_answers_go_through_the_pairs_checks(sft_out: Path, model_cfg, tmp_path: Path) -> None:
    """The pairs stage sampling with the row engine on the GPU (temperature 1.0, top_p 0.95): every answer is checked
    as before, and every pair written passes the checks (a random model's answers fail them and the rule writes the
    flaw; what matters here is that the engine's answers reach the checks and the stage completes)."""
    import json

    import pyarrow.parquet as pq

    from mathwizard.config import ModelConfig, PairsConfig
    from mathwizard.stages import pairs
    from mathwizard.stages.pairs import rejected_problems
    from tests.training.builders import teach_folder

    teach = teach_folder(tmp_path / "02-teach", n_train=6, n_val=2)
    cfg = PairsConfig(max_new_tokens=32, max_attempts=2, fallback="rule", splits=["train"])
    model = ModelConfig(name="tiny", backend="unsloth", compile="eager")
    pairs.run(cfg, model, sft_out, teach, tmp_path / "04-pairs")
    report = json.loads((tmp_path / "04-pairs" / "report.json").read_text())
    assert report["splits"]["train"]["attempts"] >= 6 and report["splits"]["train"]["generated_tokens"] > 0
    for row in pq.read_table(tmp_path / "04-pairs" / "train.parquet").to_pylist():
        assert rejected_problems(row["rejected"], row["chosen"], row["strategy"]) == []


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
