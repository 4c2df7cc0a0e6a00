"""The one `\\boxed{}` matcher (`boxed_spans`) and the answer functions built on it."""

from __future__ import annotations

import pytest

from mathwizard.answers import Boxed, boxed_answers, boxed_spans, final_answer, format_problems


def _contents(text: str) -> list[str]:
    spans = boxed_spans(text)
    assert all(text[box.start : box.end] == box.content for box in spans)  # positions and contents agree
    return [box.content for box in spans]


def test_nested_braces_stay_whole() -> None:
    text = r"so \boxed{\frac{1}{2}} is the answer"
    assert boxed_spans(text) == [Boxed(10, 21, r"\frac{1}{2}")]
    assert _contents(r"\boxed{\sqrt{a^{2}+b^{2}}}") == [r"\sqrt{a^{2}+b^{2}}"]


def test_every_box_in_order_boxed_and_fbox() -> None:
    text = r"(1) \boxed{5}; (2) \fbox{AB \parallel CD}; (3) \boxed {x^{2}} and \boxed{}"
    assert _contents(text) == ["5", r"AB \parallel CD", "x^{2}", ""]
    assert boxed_answers(text) == _contents(text)
    assert final_answer(text) == ""
    assert final_answer(r"\fbox{7}") == "7"


def test_escaped_braces_do_not_count() -> None:
    assert _contents(r"\boxed{\{1, 2\}}") == [r"\{1, 2\}"]
    assert _contents(r"\boxed{\}} then \boxed{3}") == [r"\}", "3"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"\boxed{5", []),  # never closes
        (r"\boxed{\frac{1}{2}", []),  # the inner braces close, the box does not
        (r"\boxed{4} and \boxed{5", ["4"]),  # only the closed one
        (r"\boxed{4}} and {\boxed{5}", ["4", "5"]),  # stray braces outside a box are plain text
        (r"\boxed 5 and \boxed", []),  # no brace after the command
        ("no box at all {}", []),
    ],
)
def test_unbalanced_braces(text: str, expected: list[str]) -> None:
    assert _contents(text) == expected
    assert final_answer(text) == (expected[-1] if expected else None)


def test_a_box_inside_a_box_is_found_too_and_is_the_final_answer() -> None:
    # Ordered by where each box opens: the outer one first, so the last (the final answer) is the inner one.
    assert _contents(r"\boxed{\boxed{3}}") == [r"\boxed{3}", "3"]
    assert final_answer(r"\boxed{\boxed{3}}") == "3"


def test_format_checks_count_boxes_with_the_same_matcher() -> None:
    good = "### Solution\n1. Half of it.\n### Final Answer\n\\boxed{\\frac{1}{2}}"
    assert format_problems(good) == []
    assert format_problems(good + " or \\fbox{1}") == ["final_answer_needs_exactly_one_boxed"]
    assert format_problems(good.replace("}}", "}")) == ["no_boxed_answer"]  # the box never closes
