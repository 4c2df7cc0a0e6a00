"""Reply validation: format, truncation, refusals, and agreement with the source's final answer."""

from __future__ import annotations

import pytest

from mathwizard.teacher.validate import describe, reply_problems

GOOD = "### Solution\n1. $\\angle B=\\frac{1}{2}(180^\\circ-80^\\circ)$\n### Final Answer\n\\boxed{50^\\circ}"


def test_a_good_reply_has_no_problems() -> None:
    assert reply_problems(GOOD, "50^\\circ") == []


@pytest.mark.parametrize("source", ["50°", "$50^{\\circ}$", " 50 ^\\circ "])
def test_answers_agree_after_normalisation(source: str) -> None:
    assert reply_problems(GOOD, source) == []


@pytest.mark.parametrize(
    ("text", "kwargs", "first"),
    [
        (GOOD, {"finish_reason": "length"}, "truncated"),
        (GOOD, {"finish_reason": "content_filter"}, "content_filter"),
        (GOOD, {"refusal": "I won't do that"}, "refusal"),
        ("I can't help with that request.", {}, "refusal"),
        ("", {}, "empty"),
        (GOOD.replace("### Final Answer\n", ""), {}, "missing_final_answer_header"),
        (GOOD.replace("1. ", ""), {}, "no_numbered_steps"),
        (GOOD + "\n\\boxed{50^\\circ}", {}, "final_answer_needs_exactly_one_boxed"),
        (GOOD.replace("50^\\circ}", "40^\\circ}"), {}, "answer_mismatch"),
        (GOOD.replace("\\boxed{50^\\circ}", "50"), {}, "no_boxed_answer"),
    ],
)
def test_invalid_replies_name_their_problem(text: str, kwargs: dict, first: str) -> None:
    problems = reply_problems(text, "50^\\circ", **kwargs)
    assert problems and problems[0] == first, problems


def test_problems_are_described_for_the_re_ask() -> None:
    assert describe(["answer_mismatch", "truncated"]) == (
        "its final answer differs from the reference solution's; it was cut off at the length limit before it ended;"
        " write the steps more briefly"
    )
