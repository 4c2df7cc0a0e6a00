"""Prompt files and `fill_prompt`, the one way the stages fill them (teach's rewrite prompts, pairs' user prompt)."""

from __future__ import annotations

import pytest

from mathwizard.errors import ConfigError
from mathwizard.prompts import fill_prompt, load_prompt


def test_fill_replaces_named_blanks_once_and_leaves_every_other_brace() -> None:
    template = "Q: {question}\nA: {answer} in \\boxed{} or \\boxed{...}; {later} stays"
    filled = fill_prompt(template, question="is {answer} }{ {question}?", answer="\\boxed{5}")
    assert filled == "Q: is {answer} }{ {question}?\nA: \\boxed{5} in \\boxed{} or \\boxed{...}; {later} stays"


def test_teach_prompts_fill_as_before() -> None:
    user = fill_prompt(load_prompt("rewrite_user"), question="Find {solution}.", solution="x = 1", answer="\\boxed{1}")
    assert "<problem>\nFind {solution}.\n</problem>" in user and "<reference_solution>\nx = 1\n" in user
    assert "final answer is \\boxed{1}." in user
    # The re-ask keeps {problems} for the runner, which fills it per reply.
    reask = fill_prompt(load_prompt("rewrite_reask"), answer="\\boxed{1}")
    assert reask.startswith("That reply cannot be used: {problems}.") and reask.endswith("answer, \\boxed{1}.")


def test_an_unknown_prompt_names_the_prompt_sets() -> None:
    with pytest.raises(ConfigError, match=r"no prompt 'nope' in prompt set 'v1' \(prompt sets: v1\)"):
        load_prompt("nope")
