"""Settings precedence (defaults < YAML < env < flags), validation, and secrets kept out of the settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from mathwizard.config import STAGE_DIRS, Settings, load_secrets, load_settings
from mathwizard.errors import ConfigError


def test_defaults_reproduce_the_original_recipe() -> None:
    s = load_settings()
    assert s.prepare.source == "sample" and s.prepare.max_image_size == 512
    assert s.prepare.splits == (0.90, 0.05, 0.05)
    assert (s.sft.lora.r, s.sft.lora.alpha, s.sft.lora.dropout) == (16, 16, 0.05)
    assert (s.sft.learning_rate, s.sft.max_steps, s.sft.lr_scheduler_type) == (2e-4, 320, "cosine")
    assert (s.sft.per_device_train_batch_size, s.sft.gradient_accumulation_steps, s.sft.max_length) == (4, 8, 2048)
    assert (s.dpo.lora.r, s.dpo.lora.alpha, s.dpo.lora.dropout) == (4, 4, 0.1)
    assert (s.dpo.learning_rate, s.dpo.max_steps, s.dpo.beta, s.dpo.max_prompt_length) == (5e-6, 100, 0.1, 1024)
    assert (s.pairs.temperature, s.pairs.top_p, s.pairs.max_new_tokens) == (1.0, 0.95, 1024)
    assert s.sft.lora.modules_to_save == ["lm_head", "embed_tokens"]


def test_precedence_yaml_then_env_then_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("sft:\n  max_steps: 5\n  learning_rate: 0.001\ndpo:\n  beta: 0.2\nrun_name: from-yaml\n")
    s = load_settings(recipe)
    assert (s.sft.max_steps, s.sft.learning_rate, s.dpo.beta, s.run_name) == (5, 0.001, 0.2, "from-yaml")
    assert s.sft.lora.r == 16  # untouched nested defaults survive a partial YAML section

    monkeypatch.setenv("MATHWIZARD_SFT__MAX_STEPS", "7")
    s = load_settings(recipe)
    assert (s.sft.max_steps, s.sft.learning_rate) == (7, 0.001)  # env beats YAML, per field

    s = load_settings(recipe, sft={"max_steps": 9, "learning_rate": None}, run_name=None)
    assert (s.sft.max_steps, s.sft.learning_rate, s.run_name) == (9, 0.001, "from-yaml")  # None = flag not given


def test_dotenv_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("MATHWIZARD_HOME=/data/mw\nOPENAI_API_KEY=sk-test-dotenv\nUNRELATED=1\n")
    assert load_settings().home == "/data/mw"
    assert load_secrets().teacher_api_key.get_secret_value() == "sk-test-dotenv"


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"sft": {"max_stepz": 3}}, "sft.max_stepz"),
        ({"sft": {"max_steps": 0}}, "sft.max_steps"),
        ({"prepare": {"splits": "0.9,0.2,0.05"}}, "prepare.splits"),
        ({"prepare": {"splits": "a,b,c"}}, "prepare.splits"),
        ({"teacher": {"kind": "gpt"}}, "teacher.kind"),
        ({"run_name": "../escape"}, "run_name"),
    ],
)
def test_bad_values_raise_one_line_naming_the_field(overrides: dict, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(**overrides)
    assert field in str(info.value) and "\n" not in str(info.value)


def test_missing_and_broken_config_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("sft: [unclosed\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml"):
        load_settings(broken)


def test_secrets_are_not_settings_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MATHWIZARD_TEACHER_API_KEY", "sk-should-not-leak")
    monkeypatch.setenv("HF_TOKEN", "hf_should_not_leak")
    dumped = load_settings().model_dump_json()
    assert "should-not-leak" not in dumped and "should_not_leak" not in dumped
    secrets = load_secrets()
    assert secrets.teacher_api_key.get_secret_value() == "sk-should-not-leak"
    assert "should-not-leak" not in repr(secrets)


def test_stage_dirs_are_ordered_under_the_run() -> None:
    s = Settings(home="s3://bucket/mw/", run_name="r1")
    assert s.stage_dir("sft") == "s3://bucket/mw/runs/r1/03-sft"
    assert list(STAGE_DIRS) == ["prepare", "teach", "sft", "pairs", "dpo", "eval", "publish"]
    assert s.cache_dir == "s3://bucket/mw/cache"
