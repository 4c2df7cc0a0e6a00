"""The model loader: the tiny gemma-3n (built offline), adapter folders, backends and LoRA layer selection."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mathwizard.config import LoRAConfig
from mathwizard.errors import ConfigError, ModelError
from mathwizard.manifest import file_sha256


@pytest.fixture(scope="module")
def tiny() -> tuple:
    import torch

    from mathwizard.models import load_model

    torch.set_num_threads(1)
    return load_model("tiny", "hf", for_training=False)


def _image(seed: int):
    from PIL import Image

    return Image.new("RGB", (60 + 10 * seed, 40), (40 * seed % 256, 90, 200))


def _prompts(processor, questions: list[str]) -> list[str]:
    from mathwizard.training.data import tutor_prompt

    return [
        processor.apply_chat_template(tutor_prompt(q), add_generation_prompt=True, tokenize=False) for q in questions
    ]


# ---------------------------------------------------------------------------------------------- tiny model
def test_tiny_vocabulary_mirrors_the_real_layout(tiny) -> None:
    _, processor = tiny
    tok = processor.tokenizer
    ids = tok.convert_tokens_to_ids(
        [
            *("<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>"),
            *("<end_of_image>", "<image_soft_token>", "<end_of_audio>", "<audio_soft_token>"),
        ]
    )
    # text ids < 512 (vision offset) < 576 (audio offset) < 640 (vocab), as 262144 / 262272 / 262400 in the real one
    assert ids == [0, 1, 2, 5, 6, 7, 512, 513, 576, 577]
    assert len(tok) == 640
    text = "Find ∠ABC when x² = 49 — answer \\boxed{7}"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text  # byte fallback: no <unk>
    assert tok.unk_token_id not in tok(text, add_special_tokens=False)["input_ids"]


def test_tiny_chat_template_is_gemma3n_and_an_image_is_16_soft_tokens(tiny) -> None:
    _, processor = tiny
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Find x."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "x = 2"}]},
    ]
    text = processor.apply_chat_template(messages, tokenize=False)
    # system merged into the first user turn, the assistant rendered as "model"
    assert text == (
        "<bos><start_of_turn>user\nBe brief.\n\n<image_soft_token>Find x.<end_of_turn>\n"
        "<start_of_turn>model\nx = 2<end_of_turn>\n"
    )
    batch = processor(text=[text], images=[[_image(1)]], return_tensors="pt")
    assert (batch["input_ids"] == 513).sum().item() == 16
    assert tuple(batch["pixel_values"].shape) == (1, 3, 64, 64)


def test_tiny_build_is_deterministic(tmp_path: Path) -> None:
    from mathwizard.models.tiny import build_tiny, ensure_tiny

    rebuilt = build_tiny(tmp_path / "again")
    cached = ensure_tiny()
    assert file_sha256(rebuilt / "model.safetensors") == file_sha256(cached / "model.safetensors")
    assert (rebuilt / "tokenizer.json").read_bytes() == (cached / "tokenizer.json").read_bytes()
    config = json.loads((rebuilt / "config.json").read_text())
    assert config["vision_config"]["hidden_size"] == 2048
    assert config["vision_soft_tokens_per_image"] == 16


def test_batched_left_padded_generation_matches_one_at_a_time(tiny) -> None:
    import torch

    model, processor = tiny
    questions = ["Find angle A.", "Find the length of BC in the figure.", "What is the area of the square ABCD?"]
    texts = _prompts(processor, questions)
    images = [[_image(i)] for i in range(3)]
    batch = processor(text=texts, images=images, padding=True, return_tensors="pt")
    lengths = batch["attention_mask"].sum(dim=1)
    assert processor.tokenizer.padding_side == "left"
    assert batch["attention_mask"][0, 0].item() == 0 and batch["attention_mask"][0, -1].item() == 1
    with torch.inference_mode():
        together = model.generate(**batch, max_new_tokens=6, do_sample=False)[:, batch["input_ids"].shape[1] :]
        for i in range(3):
            one = processor(text=[texts[i]], images=images[i : i + 1], return_tensors="pt")
            alone = model.generate(**one, max_new_tokens=6, do_sample=False)[:, one["input_ids"].shape[1] :]
            assert one["input_ids"].shape[1] == lengths[i].item()
            assert together[i].tolist() == alone[0].tolist()


@pytest.mark.slow  # ~14 s; the CLI tests that train (tests/cli/test_runtime.py) load the tiny folder in a new process
def test_a_fresh_process_loads_the_tiny_model_folder(tmp_path: Path) -> None:
    """The timm architecture is registered by load_model itself: a new process needs nothing else."""
    from mathwizard.models.tiny import ensure_tiny

    script = (
        "import sys; from mathwizard.models import load_model; "
        "m, p = load_model(sys.argv[1], 'hf', for_training=False); print(type(m).__name__, m.num_parameters())"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", script, str(ensure_tiny())], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[0] == "Gemma3nForConditionalGeneration"


# ------------------------------------------------------------------------------------------------ adapters
def test_adapter_folder_loads_base_then_adapter(tmp_path: Path) -> None:
    import torch

    from mathwizard.models import load_model
    from mathwizard.models.backend import add_lora
    from mathwizard.training.runner import save_adapter

    base, processor = load_model("tiny", "hf", for_training=True)
    peft_model = add_lora(base, LoRAConfig(), "hf", seed=0, gradient_checkpointing=False)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2, generator=torch.Generator().manual_seed(1))
    save_adapter(peft_model, processor, tmp_path, base_model="tiny", backend="hf")
    assert json.loads((tmp_path / "adapter" / "mathwizard_adapter.json").read_text())["base_model"] == "tiny"

    batch = processor(text=_prompts(processor, ["Find x."]), images=[[_image(2)]], return_tensors="pt")
    peft_model.eval()
    with torch.inference_mode():
        expected = peft_model(**batch).logits
        loaded, loaded_processor = load_model(tmp_path / "adapter", "hf", for_training=False)
        plain, _ = load_model("tiny", "hf", for_training=False)
        assert type(loaded).__name__ == "Gemma3nForConditionalGeneration"  # merged for inference
        torch.testing.assert_close(loaded(**batch).logits, expected, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(plain(**batch).logits, expected, atol=1e-3)
    assert loaded_processor.tokenizer.convert_tokens_to_ids("<image_soft_token>") == 513

    trainable, _ = load_model(tmp_path / "adapter", "hf", for_training=True)
    assert type(trainable).__name__.startswith("PeftModel")
    assert any(p.requires_grad for n, p in trainable.named_parameters() if "lora_" in n)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("/no/such/model", "model path /no/such/model does not exist"),
        ("runs/x/03-sft/adapter", "model path runs/x/03-sft/adapter does not exist"),
        ("google/gemma-3n-E2B-it", "cannot load model google/gemma-3n-E2B-it"),  # offline, not in the HF cache
    ],
)
def test_unloadable_models_raise_one_line_model_errors(name: str, message: str) -> None:
    from mathwizard.models import load_model

    with pytest.raises(ModelError, match=message) as caught:
        load_model(name, "hf", for_training=False)
    assert "\n" not in str(caught.value)


# ------------------------------------------------------------------------------------------------ backends
def test_resolve_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    from mathwizard.models import backend

    monkeypatch.setattr(backend, "cuda_available", lambda: False)
    assert backend.resolve_backend("auto") == "hf"
    assert backend.resolve_backend("hf") == "hf"
    with pytest.raises(ModelError, match="--backend unsloth needs a CUDA GPU"):
        backend.resolve_backend("unsloth")
    with pytest.raises(ConfigError, match=r"model\.backend must be one of"):
        backend.resolve_backend("vllm")

    monkeypatch.setattr(backend, "cuda_available", lambda: True)
    monkeypatch.setattr(backend, "unsloth_installed", lambda: False)
    assert backend.resolve_backend("auto") == "hf"
    with pytest.raises(ModelError, match="needs the unsloth package"):
        backend.resolve_backend("unsloth")
    monkeypatch.setattr(backend, "unsloth_installed", lambda: True)
    assert backend.resolve_backend("auto") == "unsloth"


def test_lora_switches_pick_layers(tiny) -> None:
    from mathwizard.models.backend import lora_target_modules

    model, _ = tiny
    every = lora_target_modules(model, LoRAConfig())
    # 2 decoder layers x (q, k, v, o attention + gate, up, down MLP) = 14; never audio, lm_head or altup/laurel
    assert len(every) == 2 * (4 + 3)
    assert all(".language_model.layers." in name for name in every)
    attention = lora_target_modules(model, LoRAConfig(finetune_mlp_modules=False))
    assert sorted({n.rsplit(".", 1)[1] for n in attention}) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    mlp = lora_target_modules(model, LoRAConfig(finetune_attention_modules=False))
    assert sorted({n.rsplit(".", 1)[1] for n in mlp}) == ["down_proj", "gate_proj", "up_proj"]
    assert len(lora_target_modules(model, LoRAConfig(target_modules=["q_proj", "v_proj"]))) == 2 * 2
    with pytest.raises(ConfigError, match="finetune_vision_layers or finetune_language_layers"):
        lora_target_modules(model, LoRAConfig(finetune_vision_layers=False, finetune_language_layers=False))
    with pytest.raises(ConfigError, match="finetune_attention_modules or finetune_mlp_modules"):
        lora_target_modules(model, LoRAConfig(finetune_attention_modules=False, finetune_mlp_modules=False))
    # The MobileNetV5 vision tower is convolutional: vision-only LoRA over linear layers finds nothing to adapt.
    with pytest.raises(ConfigError, match="matches no layer"):
        lora_target_modules(model, LoRAConfig(finetune_language_layers=False))


# ------------------------------------------------------------------------------------------- random E2B
def test_random_e2b_has_the_real_architecture_and_vocabulary_layout() -> None:
    from mathwizard.models.random_e2b import count_parameters, e2b_config, e2b_processor

    config = e2b_config()
    text = config.text_config
    assert (text.num_hidden_layers, text.hidden_size, text.num_kv_shared_layers) == (30, 2048, 10)
    assert set(text.intermediate_size) == {8192}
    assert text.activation_sparsity_pattern == [0.95] * 10 + [0.0] * 20
    assert text.layer_types.count("full_attention") == 30 // 5  # every fifth layer is global
    assert config.vision_config.architecture == "mobilenetv5_300m_enc"
    counts = count_parameters()  # on the meta device: no memory, no initialisation
    assert 5.3e9 < counts["total"] < 5.5e9, counts  # "E2B": ~5.4 B parameters, ~2 B effective
    assert counts["language_model"] > counts["audio_tower"] > counts["vision_tower"]

    processor = e2b_processor()
    tok = processor.tokenizer
    assert len(tok) == 262_400
    special = ["<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>", "<image_soft_token>"]
    assert tok.convert_tokens_to_ids([*special, "<end_of_audio>", "<audio_soft_token>"]) == [
        105,
        106,
        255_999,
        262_144,
        262_145,
        262_272,
        262_273,
    ]
    text_in = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Find x."}]}],
        add_generation_prompt=True,
        tokenize=False,
    )
    batch = processor(text=[text_in], images=[[_image(3)]], return_tensors="pt")
    assert (batch["input_ids"] == 262_145).sum().item() == 256
    assert tuple(batch["pixel_values"].shape) == (1, 3, 768, 768)


def test_hub_adapter_repos_are_loaded_from_a_whole_snapshot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A published DPO repo points at `sft-adapter/` inside itself, so it must be on disk whole."""
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError

    from mathwizard.models import resolve_model_path

    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    (snapshot / "adapter_config.json").write_text("{}")
    asked: list[str] = []

    def fake_file(repo_id: str, filename: str, **_: object) -> str:
        asked.append(repo_id)
        if repo_id == "ns/math-wizard-gemma-3n-dpo":
            return str(snapshot / filename)
        raise EntryNotFoundError(f"{filename} not in {repo_id}")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_file)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **_: str(snapshot))
    assert resolve_model_path("ns/math-wizard-gemma-3n-dpo") == str(snapshot)
    assert resolve_model_path("google/gemma-3n-E2B-it") == "google/gemma-3n-E2B-it"  # a model repo: from_pretrained
    assert asked == ["ns/math-wizard-gemma-3n-dpo", "google/gemma-3n-E2B-it"]
