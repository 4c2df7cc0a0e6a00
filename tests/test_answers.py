"""The one `\\boxed{}` matcher (`boxed_spans`), the answer functions built on it, and answer equivalence."""

from __future__ import annotations

import pytest

from mathwizard.answers import (
    Boxed,
    answer_parts,
    answers_match,
    boxed_answers,
    boxed_spans,
    final_answer,
    format_problems,
)


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


# ------------------------------------------------------------------------------------------- answers_match
@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("1/2", r"\frac{1}{2}"),
        ("0.5", r"\frac{1}{2}"),
        ("1/2", "0.5"),
        (r"\dfrac{1}{2}", r"\frac12"),  # the normaliser alone
        (r"60^\circ", "60°"),
        (r"60^{\circ}", r"60 \degree"),
        (r"2\sqrt{3}", r"\sqrt{12}"),
        (r"\frac{\sqrt{3}}{3}", r"\frac{1}{\sqrt{3}}"),
        (r"4\sqrt{2}\text{ cm}", r"\sqrt{32}"),  # a unit does not make it another answer
        ("3, 4", "3, 4.0"),  # part by part
        ("$45$", "45.0"),
    ],
)
def test_equivalent_forms_match(a: str, b: str) -> None:
    assert answers_match(a, b) and answers_match(b, a)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (r"2\sqrt{3}", r"\sqrt{13}"),
        ("1/3", "0.333"),  # a rounded value is not the exact one
        (r"2\pi", "6.28"),
        ("3, 4", "4, 3"),  # parts in another order: math-verify alone would read both as the set {3, 4}
        ("3, 4", "3"),  # a part missing
        ("(1, 2)", "(2, 1)"),
        (r"AB \parallel CD", r"AB \perp CD"),
        (r"\triangle ABC", r"\triangle ABD"),
        ("60°", "30°"),
        ("", "0"),
        (None, "1"),
    ],
)
def test_different_answers_do_not_match(a: str | None, b: str) -> None:
    assert not answers_match(a, b) and not answers_match(b, a)


def test_answer_parts_split_outside_brackets_only() -> None:
    assert answer_parts(r"(1) 3, (2) \{1, 2\}; x=(0, 1)") == ["(1) 3", r"(2) \{1, 2\}", "x=(0, 1)"]
    assert answer_parts("5") == ["5"]


def test_symbolic_checks_work_from_any_thread() -> None:
    """The teacher validates replies in its event loop's thread, where math-verify's own alarm cannot run."""
    import threading

    found: list[bool] = []
    thread = threading.Thread(target=lambda: found.append(answers_match(r"\frac{2}{4}", "0.5")))
    thread.start()
    thread.join()
    assert found == [True]


def test_an_adversarial_answer_is_bounded_and_counts_as_different(monkeypatch: pytest.MonkeyPatch) -> None:
    from mathwizard import answers

    monkeypatch.setattr(answers, "SYMBOLIC_TIMEOUT_S", 1)  # math-verify's alarm in the helper
    assert not answers_match("9^{9^{9^{9}}}", "1")
    assert answers_match("1/2", "0.5")  # the helper still answers


def test_a_helper_that_overruns_is_killed_and_replaced(monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    import importlib

    # The module as it is now (another test may have re-imported it): its function and its timeout belong together.
    answers = importlib.import_module("mathwizard.answers")
    assert answers.answers_match("1/2", "0.5")  # the helper is up
    first = answers._checker._process
    monkeypatch.setattr(answers, "CHECK_TIMEOUT_S", 0.0)  # no comparison can answer within 0 s
    # An answer that keeps the helper busy until math-verify's alarm (~2 s), not one it settles in ~0.1 s: a test
    # process descheduled between sending and waiting (a loaded machine, pytest-xdist) must not find the reply there.
    assert not answers.answers_match("9^{9^{9^{9}}}", "1")
    assert "counted as different" in caplog.text and first.poll() is not None  # killed
    monkeypatch.setattr(answers, "CHECK_TIMEOUT_S", 30.0)
    assert answers.answers_match(r"2\sqrt{3}", r"\sqrt{12}")  # a new helper
    assert answers._checker._process is not first


def test_very_long_answers_are_left_to_the_normaliser() -> None:
    long = "+".join(["1"] * 200)
    assert not answers_match(long, "200") and answers_match(long, long + " ")


def test_teach_validation_and_eval_use_the_equivalence() -> None:
    from mathwizard.generation import Completion
    from mathwizard.stages.evaluate import score
    from mathwizard.teacher.validate import reply_problems

    reply = "### Solution\n1. Half of the side.\n### Final Answer\n\\boxed{0.5}"
    assert reply_problems(reply, r"\frac{1}{2}") == []
    assert reply_problems(reply, r"\frac{1}{3}") == ["answer_mismatch"]
    row = score("id", "easy", r"so \boxed{\sqrt{12}}", Completion(text=reply.replace("0.5", r"2\sqrt{3}"), tokens=9))
    assert row["correct"] and (row["reference"], row["predicted"]) == (r"\sqrt{12}", r"2\sqrt{3}")
