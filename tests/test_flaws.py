"""The flaws of a rejected answer: which flaw an item gets, the checks a rejected answer must pass, the rule-made flaws.

The solution templates here are also the chosen answers of the pairs stage's tests (`tests/stages/test_pairs.py`).
"""

from __future__ import annotations

from collections import Counter

import pytest

from mathwizard.answers import final_answer
from mathwizard.flaws import ANSWER_CHANGING, FLAWED_STRATEGIES, choose_strategy, rejected_problems, rule_flaw
from mathwizard.prompts import load_prompt

# ------------------------------------------------------------------------------------------ fixture
ISOSCELES = (
    "### Solution\n"
    "1. Since AB = AC, triangle ABC is isosceles, so angle B = angle C = {b}^\\circ.\n"
    "2. The angles of a triangle sum to 180^\\circ.\n"
    "3. So angle A = 180^\\circ - 2 \\times {b}^\\circ = {a}^\\circ.\n"
    "### Final Answer\n"
    "\\boxed{{{a}^\\circ}}"
)
CHORD = (
    "### Solution\n"
    "1. The radius OA is 5 and the chord AB is 8, so AD = 4 where D is the midpoint of AB.\n"
    "2. OD is perpendicular to AB, so OD = \\sqrt{{5^2 - 4^2}} = {a}.\n"
    "### Final Answer\n"
    "The distance is \\boxed{{{a}}}."
)
RELATION = (
    "### Solution\n"
    "1. Both lines make a right angle with BC.\n"
    "2. Two lines perpendicular to the same line are parallel.\n"
    "### Final Answer\n"
    "\\boxed{{AB \\parallel CD}}"
)
NOT_FORMATTED = "The answer is 7 by symmetry."


def solution(template: str, n: int) -> str:
    """A chosen answer of kind `template` (isosceles, chord, relation, invalid), its numbers varied by `n`."""
    b = 40 + n % 20
    return {
        "isosceles": ISOSCELES.format(b=b, a=180 - 2 * b),
        "chord": CHORD.format(a=3),
        "relation": RELATION.format(),
        "invalid": NOT_FORMATTED,
    }[template]


# ----------------------------------------------------------------------------------------- strategy
def test_strategy_is_fixed_by_id_and_seed() -> None:
    # Pinned, so a change in the choice shows up (the pairs tests rely on these).
    pinned = {"q0": "broken_process", "q2": "calculation_error", "q6": "calculation_error", "q7": "misapplied_concept"}
    assert {i: choose_strategy(i, 42) for i in pinned} == pinned
    spread = Counter(choose_strategy(f"id{i}", 42) for i in range(300))
    assert set(spread) == set(FLAWED_STRATEGIES) and min(spread.values()) > 60  # roughly a third each
    assert [choose_strategy(f"id{i}", 1) for i in range(30)] != [choose_strategy(f"id{i}", 42) for i in range(30)]


def test_every_flaw_has_its_system_prompt() -> None:
    assert set(ANSWER_CHANGING) < set(FLAWED_STRATEGIES)
    for strategy in FLAWED_STRATEGIES:
        assert "### Final Answer" in load_prompt(f"flawed_{strategy}")


# ------------------------------------------------------------------------------------------- checks
CHOSEN = ISOSCELES.format(b=50, a=80)
VALID_OTHER_ANSWER = "### Solution\n1. Angle A = 180 - 2 x 49 = 82.\n### Final Answer\n\\boxed{82^\\circ}"
VALID_SAME_ANSWER = "### Solution\n1. Angle A is 80 degrees by the figure.\n### Final Answer\n\\boxed{80°}"


@pytest.mark.parametrize(
    ("rejected", "strategy", "expected"),
    [
        (VALID_OTHER_ANSWER, "calculation_error", []),
        (VALID_OTHER_ANSWER, "misapplied_concept", []),
        (VALID_OTHER_ANSWER, "broken_process", []),
        # 80° and 80^\circ normalise to the same answer: a wrong-answer flaw must change it, a broken process may not.
        (VALID_SAME_ANSWER, "calculation_error", ["same_final_answer"]),
        (VALID_SAME_ANSWER, "misapplied_concept", ["same_final_answer"]),
        (VALID_SAME_ANSWER, "broken_process", []),
        # Only whitespace and case differ from the chosen answer.
        (CHOSEN.replace("\n", " \n\n").replace("So angle", "so angle"), "broken_process", ["same_as_chosen"]),
        (CHOSEN, "calculation_error", ["same_as_chosen", "same_final_answer"]),
        ("", "broken_process", ["format:empty"]),
        (
            "The answer is \\boxed{82}.",
            "calculation_error",
            ["format:missing_solution_header", "format:missing_final_answer_header"],
        ),
        (
            "### Solution\nAngle A is 82.\n### Final Answer\n\\boxed{82}",
            "calculation_error",
            ["format:no_numbered_steps"],
        ),
        (
            "### Solution\n1. Angle A is 82.\n### Final Answer\n\\boxed{82} or \\boxed{83}",
            "broken_process",
            ["format:final_answer_needs_exactly_one_boxed"],
        ),
        ("### Solution\n1. Angle A is 82.\n### Final Answer\n82", "calculation_error", ["format:no_boxed_answer"]),
    ],
)
def test_rejected_answer_checks(rejected: str, strategy: str, expected: list[str]) -> None:
    assert rejected_problems(rejected, CHOSEN, strategy) == expected


# ---------------------------------------------------------------------------------- rule-made flaws
@pytest.mark.parametrize("template", ["isosceles", "chord"])
@pytest.mark.parametrize("strategy", FLAWED_STRATEGIES)
def test_rule_flaw_passes_the_checks(template: str, strategy: str) -> None:
    chosen = solution(template, 10)
    flawed = rule_flaw(chosen, strategy)
    assert flawed is not None and rejected_problems(flawed, chosen, strategy) == []
    if strategy == "broken_process":
        assert flawed.count("\n1. ") == 1 and flawed.count(". ") < chosen.count(". ")  # a step is gone
        assert final_answer(flawed) == final_answer(chosen)
    else:
        assert final_answer(flawed) != final_answer(chosen)


def test_rule_flaws_are_what_they_say() -> None:
    calc = rule_flaw(CHOSEN, "calculation_error")
    # The final step and the boxed answer carry the same slip: 80 -> 81.
    assert "= 81^\\circ.\n### Final Answer\n\\boxed{81^\\circ}" in calc  # type: ignore[operator]
    misapplied = rule_flaw(CHOSEN, "misapplied_concept")
    # "isosceles" becomes "equilateral" and the result doubles: 80 -> 160.
    assert "equilateral" in misapplied and misapplied.endswith("\\boxed{160^\\circ}")  # type: ignore[operator]
    broken = rule_flaw(CHOSEN, "broken_process")
    # Three steps -> the middle one is dropped, the rest renumbered 1, 2.
    assert "sum to 180" not in broken and "\n2. So angle A" in broken  # type: ignore[operator]


def test_rule_flaws_edit_inside_the_last_box_nested_braces_and_fbox_included() -> None:
    # The boxed answer has nested braces, and an earlier box in the steps must stay as it is.
    chosen = (
        "### Solution\n1. The shaded part is \\boxed{1} of 4 equal parts, so it is \\frac{3}{4} of the rest.\n"
        "### Final Answer\n\\boxed{\\frac{3}{4}}"
    )
    calc = rule_flaw(chosen, "calculation_error")
    # The last number of the last box, 4 -> 5, in the box and in the step that states it; the first box is kept.
    assert calc is not None and calc.endswith("\\boxed{\\frac{3}{5}}") and "is \\frac{3}{5} of the rest" in calc
    assert "is \\boxed{1} of 4 equal parts" in calc
    misapplied = rule_flaw(chosen, "misapplied_concept")
    # No concept to confuse: the first number of the box doubles, with a (wrong) symmetry step saying so.
    assert misapplied is not None and misapplied.endswith("\\boxed{\\frac{6}{4}}")
    assert "2. Since the figure is symmetric about this line, the result doubles: 2 \\times \\frac{3}{4}" in misapplied

    fbox = RELATION.format().replace("\\boxed{AB \\parallel CD}", "\\fbox{AB \\parallel CD}")
    swapped = rule_flaw(fbox, "misapplied_concept")
    assert swapped is not None and swapped.endswith("\\fbox{AB \\perp CD}")


def test_rule_gives_up_rather_than_write_an_invalid_flaw() -> None:
    relation = solution("relation", 0)
    assert rule_flaw(relation, "calculation_error") is None  # no number in \boxed{AB \parallel CD}
    swapped = rule_flaw(relation, "misapplied_concept")
    assert swapped is not None and swapped.endswith("\\boxed{AB \\perp CD}")  # the concept inside the answer
    assert rule_flaw(NOT_FORMATTED, "broken_process") is None
    unclosed = CHOSEN.removesuffix("}")  # the boxed answer never closes: nothing to change, nothing written
    assert rule_flaw(unclosed, "calculation_error") is None
