"""The offline rule teacher: MM_Math solutions become numbered steps with the source's own final answer."""

from __future__ import annotations

import pytest

from mathwizard.answers import answers_match, boxed_answers, final_answer, format_problems
from mathwizard.teacher.rule import RuleError, rewrite
from mathwizard.teacher.validate import reply_problems
from scripts.make_sample import problems


def _steps(text: str) -> list[str]:
    body = text.split("### Solution\n", 1)[1].split("\n### Final Answer", 1)[0]
    return [line.split(". ", 1)[1] for line in body.splitlines()]


def test_every_sample_solution_becomes_a_valid_rewrite() -> None:
    sample = problems()
    valid = [p for p in sample if not reply_problems(rewrite(p.solution), final_answer(p.solution))]
    assert len(valid) == len(sample) == 60  # 15 templates x 4 problems


def test_pythagoras_solution_is_split_at_line_breaks() -> None:
    source = (
        r"\textbf{Solution:} In $\triangle ABC$, $\angle C=90^\circ$, \\ by the Pythagorean theorem, "
        r"$AB^2=AC^2+BC^2=4^2+3^2=25$, \\ $\therefore AB=\sqrt{25}=\boxed{5}$."
    )
    assert rewrite(source) == "\n".join(
        [
            "### Solution",
            r"1. In $\triangle ABC$, $\angle C=90^\circ$",
            r"2. by the Pythagorean theorem, $AB^2=AC^2+BC^2=4^2+3^2=25$",
            r"3. $\therefore AB=\sqrt{25}=5$.",
            "### Final Answer",
            r"\boxed{5}",
        ]
    )


def test_connectives_inside_math_split_with_balanced_dollars() -> None:
    text = rewrite(r"Solution: $\because AB=AC, \therefore \angle B=\angle C=\boxed{50^\circ}$")
    steps = _steps(text)
    assert steps == [r"$\because AB=AC$", r"$\therefore \angle B=\angle C=50^\circ$"]
    assert all(step.count("$") % 2 == 0 for step in steps)


def test_sentence_connectives_start_steps() -> None:
    source = (
        r"Since $AB=AC$, we get $\angle B=\angle C$. Therefore $\angle B=\frac{1}{2}(180^\circ-40^\circ)=70^\circ$. "
        r"So the answer is $\boxed{70^\circ}$."
    )
    assert _steps(rewrite(source)) == [
        r"Since $AB=AC$, we get $\angle B=\angle C$.",
        r"Therefore $\angle B=\frac{1}{2}(180^\circ-40^\circ)=70^\circ$.",
        r"So the answer is $70^\circ$.",
    ]


def test_environments_and_display_math_are_not_split() -> None:
    source = (
        r"\textbf{Solution:} $\begin{cases} x+y=5 \\ x-y=1 \end{cases}$, \\ $$x=3 \\ y=2$$ \\ "
        r"$\therefore$ \\ the product is $\boxed{6}$"
    )
    steps = _steps(rewrite(source))
    assert steps == [
        r"$\begin{cases} x+y=5 \\ x-y=1 \end{cases}$",
        r"$$x=3 \\ y=2$$",
        r"$\therefore$ the product is $6$",  # a bare connective is glued to the next piece
    ]


def test_only_the_last_boxed_answer_is_kept_and_boxed_once() -> None:
    text = rewrite(r"(1) $AB=\boxed{5}$; \\ (2) $\angle C=\boxed{\dfrac{1}{2}}$")
    assert boxed_answers(text) == [r"\dfrac{1}{2}"]
    assert format_problems(text) == []
    assert answers_match(final_answer(text), r"\frac{1}{2}")


def test_no_boxed_answer_cannot_be_rewritten() -> None:
    with pytest.raises(RuleError, match="no \\\\boxed"):
        rewrite(r"\textbf{Solution:} $AB=5$.")


def test_rewrite_is_deterministic() -> None:
    source = problems()[7].solution
    assert rewrite(source) == rewrite(source)
