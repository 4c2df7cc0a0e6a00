"""The command line: help for every subcommand, versions, effective settings, one-line errors."""

from __future__ import annotations

import json

import pytest
import typer
from typer.testing import CliRunner

from mathwizard.cli import app, handles_errors
from mathwizard.errors import DataError

runner = CliRunner()


def _commands(group: typer.Typer, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = [(*prefix, c.name or c.callback.__name__) for c in group.registered_commands]
    for sub in group.registered_groups:
        found += _commands(sub.typer_instance, (*prefix, sub.name))
    return found


@pytest.mark.parametrize("command", _commands(app), ids=" ".join)
def test_every_subcommand_has_help(command: tuple[str, ...]) -> None:
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.startswith("mathwizard ")


def test_config_prints_effective_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MATHWIZARD_DPO__BETA", "0.3")
    result = runner.invoke(app, ["config", "--run-name", "exp1"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["dpo"]["beta"] == 0.3 and data["run_name"] == "exp1"


def test_invalid_setting_is_one_line_without_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MATHWIZARD_SFT__MAX_STEPS", "-1")
    result = runner.invoke(app, ["config"])
    assert result.exit_code == 1
    assert "sft.max_steps" in result.output and "Traceback" not in result.output


def test_library_errors_become_exit_code_1() -> None:
    @handles_errors
    def boom() -> None:
        raise DataError("data/x.parquet is empty; run `mathwizard prepare` first")

    with pytest.raises(typer.Exit) as info:
        boom()
    assert info.value.exit_code == 1
