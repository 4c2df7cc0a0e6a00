"""Settings precedence (defaults < YAML < env < flags), validation, and secrets kept out of the settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from mathwizard.config import STAGE_DIRS, Settings, load_secrets, load_settings
from mathwizard.errors import ConfigError


def test_defaults_keep_the_original_hyperparameters_with_lengths_sized_by_the_data() -> None:
    s = load_settings()
    assert s.prepare.source == "sample" and s.prepare.max_image_size == 512
    assert s.prepare.splits == (0.90, 0.05, 0.05)
    assert (s.sft.lora.r, s.sft.lora.alpha, s.sft.lora.dropout) == (16, 16, 0.05)
    assert (s.sft.learning_rate, s.sft.lr_scheduler_type) == (2e-4, "cosine")
    assert (s.sft.per_device_train_batch_size, s.sft.gradient_accumulation_steps, s.sft.max_length) == (4, 8, 2048)
    assert (s.dpo.lora.r, s.dpo.lora.alpha, s.dpo.lora.dropout) == (4, 4, 0.1)
    assert (s.dpo.learning_rate, s.dpo.beta, s.dpo.max_prompt_length) == (5e-6, 0.1, 1024)
    assert (s.pairs.temperature, s.pairs.top_p) == (1.0, 0.95)
    assert s.sft.lora.modules_to_save == ["lm_head", "embed_tokens"]
    # Lengths scale with the data: 2 epochs of MM_Math at 32 rows per step is about the original 320 SFT steps,
    # 0.15 of its pairs at 8 per step about the original 100 DPO steps; answers get 1.5 x the longest reference.
    assert (s.sft.max_steps, s.sft.num_train_epochs, s.dpo.max_steps, s.dpo.num_train_epochs) == (None, 2.0, None, 0.15)
    assert s.pairs.max_new_tokens is None and s.eval.max_new_tokens is None


def test_the_real_recipe_pins_the_original_lengths() -> None:
    s = load_settings(Path(__file__).resolve().parents[1] / "deployments" / "recipes" / "gemma-3n-e2b.yaml")
    assert (s.sft.max_steps, s.dpo.max_steps, s.pairs.max_new_tokens, s.eval.max_new_tokens) == (320, 100, 1024, 1024)
    effective = (s.sft.per_device_train_batch_size * s.sft.gradient_accumulation_steps,
                 s.dpo.per_device_train_batch_size * s.dpo.gradient_accumulation_steps)  # fmt: skip
    assert effective == (32, 8)  # the original 4 x 8 and 2 x 4


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
        ({"teacher": {"mode": "offline"}}, "teacher.mode"),
        ({"teacher": {"batch_max_requests": 0}}, "teacher.batch_max_requests"),
        ({"teacher": {"batch_discount": 1.5}}, "teacher.batch_discount"),
        ({"teacher": {"batch_reask": "never"}}, "teacher.batch_reask"),
        ({"run_name": "../escape"}, "run_name"),
        ({"model": {"compile": "fast"}}, "model.compile"),
    ],
)
def test_bad_values_raise_one_line_naming_the_field(overrides: dict, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(**overrides)
    assert field in str(info.value) and "\n" not in str(info.value)


def test_model_compile_takes_layers_from_yaml_env_and_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings().model.compile == "eager"  # the default until measured on the GPU
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  compile: layers\n")
    assert load_settings(recipe).model.compile == "layers"
    assert load_settings(model={"compile": "layers"}).model.compile == "layers"
    monkeypatch.setenv("MATHWIZARD_MODEL__COMPILE", "layers")
    assert load_settings().model.compile == "layers"


def test_missing_and_broken_config_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("sft: [unclosed\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml"):
        load_settings(broken)


@pytest.mark.parametrize(
    ("text", "holds"),
    [("- teacher\n- sft\n", "holds a list"), ("smoke\n", "holds a single string"), ("42\n", "holds a number")],
)
def test_a_recipe_that_is_not_a_mapping_is_one_clear_line(tmp_path: Path, text: str, holds: str) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_settings(recipe)
    assert str(info.value) == (
        f"{recipe} {holds}, not a mapping of settings; a recipe maps sections to their fields, e.g."
        " `teacher: {kind: rule}` (see deployments/recipes/smoke.yaml)"
    )


@pytest.mark.parametrize(
    ("text", "key", "lines"),
    [
        ("teacher:\n  kind: rule\nsft:\n  max_steps: 2\nteacher:\n  concurrency: 4\n", "teacher", (1, 5)),
        ("teacher:\n  kind: rule\n  concurrency: 3\n  kind: openai\n", "kind", (2, 4)),  # nested
    ],
)
def test_a_key_given_twice_is_an_error_naming_it(tmp_path: Path, text: str, key: str, lines: tuple[int, int]) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_settings(recipe)
    assert str(info.value) == (
        f"{recipe}: key {key!r} appears twice in one mapping (lines {lines[0]} and {lines[1]}); a YAML loader would"
        " silently keep the last, so remove one of them"
    )


@pytest.mark.parametrize("text", ["- teacher\n- sft\n", "sft:\n  max_steps: 2\nsft:\n  max_steps: 3\n"])
def test_the_cli_shows_a_bad_recipe_as_one_red_line(tmp_path: Path, text: str) -> None:
    from typer.testing import CliRunner

    from mathwizard.cli import app

    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    result = CliRunner().invoke(app, ["config", "-c", str(recipe)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.startswith("error: ") and result.output.count("error:") == 1


def test_yaml_anchors_and_merges_still_work(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("x-base: &base {max_steps: 3, learning_rate: 0.001}\nsft:\n  <<: *base\n  max_steps: 4\n")
    s = load_settings(recipe)
    assert (s.sft.max_steps, s.sft.learning_rate) == (4, 0.001)  # a merge key overridden on purpose is no duplicate


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
