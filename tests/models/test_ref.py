"""The one model resolver: what 'tiny', a Hub id, a model folder, an adapter folder or a stage folder means, and
what identifies its weights in the fingerprints of the stages that load it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mathwizard.config import ModelConfig
from mathwizard.errors import ModelError
from mathwizard.manifest import file_sha256, stage_output
from mathwizard.models import write_adapter_pointer
from mathwizard.models.ref import ModelRef, resolve
from mathwizard.models.tiny import TINY_VERSION

HF32 = ModelConfig(backend="hf", dtype="float32")


def adapter(folder: Path, base: str, weights: bytes = b"lora weights") -> Path:
    """An adapter folder as the training stages save one: PEFT's config, the weights, our pointer to the base."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    (folder / "adapter_model.safetensors").write_bytes(weights)
    write_adapter_pointer(folder, base, "hf")
    return folder


def stage_folder(folder: Path, stage: str, fp: str, base: str) -> Path:
    """A finished 03-sft / 05-dpo folder: its adapter/ and a manifest listing the weights."""
    with stage_output(folder, stage=stage, version=1, fingerprint=fp) as record:
        adapter(folder / "adapter", base)
        record.add_file("adapter/adapter_model.safetensors")
    return folder


def test_tiny() -> None:
    ref = resolve("tiny")
    assert ref == ModelRef(location="tiny") and not ref.is_adapter
    assert ref.source_identity() == {"name": "tiny", "tiny_version": TINY_VERSION}  # rebuilt tiny: new identity
    assert ref.identity(HF32) == {
        "name": "tiny",
        "tiny_version": TINY_VERSION,
        "backend": "hf",
        "dtype": "float32",
        "load_in_4bit": False,
    }
    assert (ref.chain(), ref.root) == ([], "tiny")
    with pytest.raises(ModelError, match="tiny is not an adapter folder; pass the SFT stage folder"):
        resolve("tiny", adapter=True)


def test_a_hub_id_is_taken_by_name_without_the_network() -> None:
    ref = resolve("google/gemma-3n-E2B-it")  # HF_HUB_OFFLINE=1 (tests/conftest.py): nothing is asked
    assert ref == ModelRef(location="google/gemma-3n-E2B-it")
    assert ref.identity(ModelConfig(backend="hf", dtype="bfloat16", load_in_4bit=True)) == {
        "name": "google/gemma-3n-E2B-it",
        "backend": "hf",
        "dtype": "bfloat16",
        "load_in_4bit": True,
    }
    assert ref.root == "google/gemma-3n-E2B-it"


def test_a_stage_folder_means_its_adapter_identified_by_the_manifest(tmp_path: Path) -> None:
    stage = stage_folder(tmp_path / "run" / "03-sft", "sft", "f" * 64, "tiny")
    ref = resolve(stage)
    assert ref == ModelRef(location=str((stage / "adapter").resolve()), stage="sft", fingerprint="f" * 64)
    assert ref.is_adapter and resolve(stage / "adapter") == ref  # the adapter/ itself: the same model
    assert resolve(stage, adapter=True) == ref
    assert ref.identity(HF32) == {
        "stage": "sft",
        "fingerprint": "f" * 64,
        "backend": "hf",
        "dtype": "float32",
        "load_in_4bit": False,
    }
    # A stage folder is identified by its fingerprint, not its path: a moved run keeps its downstream fingerprints.
    moved = tmp_path / "elsewhere" / "03-sft"
    shutil.copytree(stage, moved)
    assert resolve(moved).identity(HF32) == ref.identity(HF32)
    assert json.dumps(ref.identity(HF32))  # JSON-able, for fingerprints


def test_an_adapter_folder_outside_a_run_is_identified_by_its_weights(tmp_path: Path) -> None:
    folder = adapter(tmp_path / "my-adapter", "tiny")
    ref = resolve(folder)
    weights = folder / "adapter_model.safetensors"
    assert ref == ModelRef(location=str(folder.resolve()), stage="adapter", fingerprint=file_sha256(weights))
    weights.write_bytes(b"retrained weights")
    assert resolve(folder).fingerprint == file_sha256(weights) != ref.fingerprint


def test_a_model_folder_is_taken_by_its_path(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    ref = resolve(tmp_path / "model")
    assert ref == ModelRef(location=str((tmp_path / "model").resolve()))
    assert ref.source_identity() == {"name": str((tmp_path / "model").resolve())}
    with pytest.raises(ModelError, match=r"model holds no adapter \(adapter_config\.json\); run `mathwizard sft`"):
        resolve(tmp_path / "model", adapter=True)


@pytest.mark.parametrize(
    ("reference", "message"),
    [
        ("/no/such/model", "model path /no/such/model does not exist; pass an existing folder, 'tiny' or a Hub id"),
        ("./runs/03-sft", "model path ./runs/03-sft does not exist"),
        ("runs/x/03-sft/adapter", "model path runs/x/03-sft/adapter does not exist"),  # no Hub id has 3 slashes
    ],
)
def test_a_missing_path_is_one_model_error(reference: str, message: str) -> None:
    with pytest.raises(ModelError) as info:
        resolve(reference)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_a_file_or_a_missing_adapter_is_refused(tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelError, match=r"weights\.bin is a file; pass a model folder"):
        resolve(tmp_path / "weights.bin")
    with pytest.raises(ModelError, match=r"missing-sft is not an adapter folder; pass the SFT stage folder"):
        resolve(tmp_path / "missing-sft", adapter=True)


def test_the_chain_below_a_dpo_adapter_ends_at_the_base(tmp_path: Path) -> None:
    sft = stage_folder(tmp_path / "03-sft", "sft", "s" * 64, "tiny")
    dpo = stage_folder(tmp_path / "05-dpo", "dpo", "d" * 64, str(sft / "adapter"))
    ref = resolve(dpo)
    assert ref.chain() == [str((sft / "adapter").resolve()), "tiny"]  # nearest first
    assert ref.root == "tiny" and resolve(sft).chain() == ["tiny"]

    loop_a, loop_b = tmp_path / "a", tmp_path / "b"
    adapter(loop_a, "tiny")
    adapter(loop_b, str(loop_a))
    write_adapter_pointer(loop_a, str(loop_b), "hf")  # a hand-edited pointer: a -> b -> a
    with pytest.raises(ModelError, match="loops or is deeper than 8"):
        resolve(loop_a).chain()


def test_speed_settings_are_not_part_of_the_identity() -> None:
    ref = resolve("tiny")
    fast = ModelConfig(backend="hf", dtype="float32", compile="unsloth", decode="compiled")
    assert ref.identity(fast) == ref.identity(HF32)
    assert ref.identity(ModelConfig(backend="hf", dtype="bfloat16")) != ref.identity(HF32)


def test_the_generator_loads_the_location_with_the_model_settings() -> None:
    import torch

    torch.set_num_threads(1)
    generate = resolve("tiny").generator(ModelConfig(backend="hf", dtype="float32", decode="auto"), batch_size=3)
    assert (generate.name, generate.batch_size, generate.decode) == ("tiny", 3, "graphs")  # auto: gemma-3n's engine
    assert next(generate.model.parameters()).dtype == torch.float32 and not generate.model.training


def test_a_damaged_stage_folder_is_one_data_error_naming_its_command(tmp_path: Path) -> None:
    from mathwizard.errors import DataError

    stage = stage_folder(tmp_path / "03-sft", "sft", "f" * 64, "tiny")
    (stage / "adapter" / "adapter_model.safetensors").write_bytes(b"cut")
    expected = (
        f"{stage.resolve()} is damaged (adapter/adapter_model.safetensors is 3 bytes, not the 12 recorded);"
        " run `mathwizard sft` again to redo it"
    )
    for reference in (stage, stage / "adapter"):
        with pytest.raises(DataError) as info:
            resolve(reference)
        assert str(info.value) == expected
