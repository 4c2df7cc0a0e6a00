"""Every recipe under deployments/recipes loads through Settings, and every key in it takes effect.

The alignment-handbook's recipes drifted from its config class unnoticed; this test makes that drift a failure.
Nested stage models forbid unknown keys, but the top level ignores them (so .env files may hold other variables),
hence the explicit check that each value in the file is the value the settings carry.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from mathwizard.config import Settings, load_settings

RECIPES = sorted((Path(__file__).resolve().parents[1] / "deployments" / "recipes").glob("*.yaml"))


def leaves(tree: Any, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    if isinstance(tree, dict):
        return [leaf for key, value in tree.items() for leaf in leaves(value, (*prefix, str(key)))]
    return [(prefix, tree)]


def test_the_recipes_exist() -> None:
    assert {p.name for p in RECIPES} >= {"smoke.yaml", "gemma-3n-e2b.yaml"}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_loads_and_every_key_takes_effect(recipe: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(recipe.parent)  # no stray .env from the working directory
    raw = yaml.safe_load(recipe.read_text())
    unknown = sorted(set(raw) - set(Settings.model_fields))
    assert not unknown, f"{recipe.name}: unknown top-level keys {unknown}"

    settings = load_settings(recipe)
    dumped = settings.model_dump(mode="json")
    for path, value in leaves(raw):
        actual: Any = dumped
        for key in path:
            actual = actual[key]
        expected = list(value) if isinstance(value, tuple) else value
        if isinstance(expected, float) or isinstance(actual, float):
            assert actual == pytest.approx(expected), f"{recipe.name}: {'.'.join(path)}"
        else:
            assert actual == expected, f"{recipe.name}: {'.'.join(path)} is {actual!r}, the file says {expected!r}"


def test_recipe_names_its_run(monkeypatch: pytest.MonkeyPatch) -> None:
    # Each recipe writes to its own run folder, so running the smoke recipe never touches a real run.
    names = [load_settings(recipe).run_name for recipe in RECIPES]
    assert len(set(names)) == len(names)


def test_a_typo_in_a_recipe_fails(tmp_path: Path) -> None:
    from mathwizard.errors import ConfigError

    bad = tmp_path / "bad.yaml"
    bad.write_text("sft:\n  max_step: 2\n")
    with pytest.raises(ConfigError, match=r"sft\.max_step"):
        load_settings(bad)
