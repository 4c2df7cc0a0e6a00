"""The three flaws of a rejected answer: which one an item gets, what a flawed answer must pass, and rule-made ones.

A flaw is a calculation error, a misapplied concept or a broken process (`FLAWED_STRATEGIES`; each has its system
prompt `flawed_<strategy>`). `choose_strategy` fixes an item's flaw from its id and the seed. `rejected_problems` says
why a text cannot be the rejected answer (out of format, a copy of the chosen answer, or, for the two flaws in
`ANSWER_CHANGING`, the same final answer). `rule_flaw` writes the flaw deterministically into the chosen answer, for
when sampling gives up (a random tiny model never writes valid text), and returns only text that passes the checks.
Boxed answers are found and edited through `mathwizard.answers.boxed_spans`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from mathwizard.answers import (
    FINAL_HEADER,
    SOLUTION_HEADER,
    answers_match,
    boxed_spans,
    final_answer,
    format_problems,
)
from mathwizard.manifest import stable_hash

FLAWED_STRATEGIES = ("calculation_error", "misapplied_concept", "broken_process")
# The two flaws that must change the final answer; a broken process may keep it.
ANSWER_CHANGING = frozenset({"calculation_error", "misapplied_concept"})


def choose_strategy(item_id: str, seed: int) -> str:
    """The item's flaw: fixed by its id and the seed, so a re-run (or a resumed run) asks for the same flaw."""
    return FLAWED_STRATEGIES[int(stable_hash("strategy", seed, item_id)[:8], 16) % len(FLAWED_STRATEGIES)]


def _normalized_text(text: str) -> str:
    return " ".join(text.split()).casefold()


def rejected_problems(rejected: str, chosen: str, strategy: str) -> list[str]:
    """Why `rejected` cannot be the flawed answer for `chosen` under `strategy`; empty when it can."""
    problems = [f"format:{reason}" for reason in format_problems(rejected)]
    if _normalized_text(rejected) == _normalized_text(chosen):
        problems.append("same_as_chosen")
    if strategy in ANSWER_CHANGING and answers_match(final_answer(rejected), final_answer(chosen)):
        problems.append("same_final_answer")
    return problems


# ---------------------------------------------------------------------------------------- rule-made flaws
_STEP_START = re.compile(r"^(\s*)(\d+)([.)])(\s+)")
_NUMBER = re.compile(r"(?<![\d.])\d+(?:\.\d+)?(?!\d|\.\d)")
# Concept confusions a student makes; the first that occurs in the steps is swapped in (either direction).
_CONCEPT_SWAPS: tuple[tuple[str, str], ...] = (
    ("complementary", "supplementary"),
    ("perpendicular", "parallel"),
    ("\\perp", "\\parallel"),
    ("\\sin", "\\cos"),
    ("radius", "diameter"),
    ("congruent", "similar"),
    ("\\cong", "\\sim"),
    ("isosceles", "equilateral"),
    ("area", "perimeter"),
    ("midpoint", "endpoint"),
    ("bisector", "median"),
    ("inscribed", "central"),
)


@dataclass
class _Solution:
    """An answer split into the text up to its first step, the numbered steps, and the final-answer part."""

    head: str
    steps: list[str]
    tail: str

    @classmethod
    def parse(cls, text: str) -> _Solution | None:
        start, end = text.find(SOLUTION_HEADER), text.find(FINAL_HEADER)
        if start < 0 or end < start:
            return None
        head, steps = text[: start + len(SOLUTION_HEADER)], []
        for line in text[start + len(SOLUTION_HEADER) : end].splitlines(keepends=True):
            if _STEP_START.match(line):
                steps.append(line)
            elif steps:
                steps[-1] += line  # a step's continuation line
            else:
                head += line
        return cls(head, steps, text[end:]) if steps else None

    def render(self) -> str:
        steps = [_STEP_START.sub(rf"\g<1>{n}\g<3>\g<4>", step, count=1) for n, step in enumerate(self.steps, 1)]
        return self.head + "".join(s if s.endswith("\n") else s + "\n" for s in steps) + self.tail


def _format_number(value: float, like: str) -> str:
    decimals = len(like.split(".")[1]) if "." in like else 0
    return f"{value:.{decimals}f}" if decimals else str(round(value))


def _replace_last_number(text: str, old: str, new: str, start: int = 0) -> str | None:
    found = [m for m in _NUMBER.finditer(text) if m[0] == old and m.start() >= start]
    return None if not found else text[: found[-1].start()] + new + text[found[-1].end() :]


def _change_result(
    text: str, change: Callable[[str], str], *, number: int = -1, in_steps: bool = True
) -> tuple[str, str, str] | None:
    """Change one number (`number`: its index, -1 the last) of the boxed answer and, with `in_steps`, that number
    where the last step that states it does.

    Returns the new text and the boxed answer before and after, or None when the boxed answer holds no number.
    """
    boxes = boxed_spans(text)
    numbers = list(_NUMBER.finditer(boxes[-1].content)) if boxes else []
    if not numbers:
        return None
    box, target = boxes[-1], numbers[number]
    old, new = target[0], change(target[0])
    before = box.content
    after = before[: target.start()] + new + before[target.end() :]
    text = text[: box.start] + after + text[box.end :]
    solution = _Solution.parse(text)
    if not in_steps or solution is None:
        return text, before, after
    for i in range(len(solution.steps) - 1, -1, -1):
        number_end = _STEP_START.match(solution.steps[i]).end()  # type: ignore[union-attr]  # skip "3. " itself
        changed = _replace_last_number(solution.steps[i], old, new, number_end)
        if changed is not None:
            solution.steps[i] = changed
            break
    return solution.render(), before, after


def _calculation_error(chosen: str) -> str | None:
    """An off-by-one slip in the last computation: the final step and the boxed answer both carry it."""
    changed = _change_result(chosen, lambda old: _format_number(float(old) + 1, old))
    return changed[0] if changed else None


def _swap_concept(text: str) -> str | None:
    """`text` with its first known concept term replaced by the one students confuse it with."""
    hits = []
    for a, b in _CONCEPT_SWAPS:
        for old, new in ((a, b), (b, a)):
            pattern = rf"{re.escape(old)}(?![A-Za-z])" if old.startswith("\\") else rf"\b{re.escape(old)}\b"
            if match := re.search(pattern, text):
                hits.append((match.start(), match.end(), new))
    if not hits:
        return None
    start, end, new = min(hits)
    return text[:start] + new + text[end:]


def _misapplied_concept(chosen: str) -> str | None:
    """A confused concept (e.g. supplementary for complementary) that doubles the result."""
    solution = _Solution.parse(chosen)
    if solution is None:
        return None
    swapped = next((i for i, step in enumerate(solution.steps) if _swap_concept(step) is not None), None)
    if swapped is not None:
        solution.steps[swapped] = _swap_concept(solution.steps[swapped])  # type: ignore[assignment]
        changed = _change_result(solution.render(), _doubled, number=0)
        if changed is not None:
            return changed[0]
    else:
        changed = _change_result(chosen, _doubled, number=0, in_steps=False)
        if changed is not None:
            # No known concept to confuse: wrongly invoke a symmetry, stated as a step, that doubles the result.
            text, old, new = changed
            solution = _Solution.parse(text)
            solution.steps.append(  # type: ignore[union-attr]
                f"1. Since the figure is symmetric about this line, the result doubles: 2 \\times {old} = {new}.\n"
            )
            return solution.render()  # type: ignore[union-attr]
    # A non-numeric answer (a relation, a name): confuse the concept inside the boxed answer itself.
    text = solution.render()
    boxes = boxed_spans(text)
    inner = _swap_concept(boxes[-1].content) if boxes else None
    return None if inner is None else text[: boxes[-1].start] + inner + text[boxes[-1].end :]


def _doubled(old: str) -> str:
    return _format_number(float(old) * 2 if float(old) else 1.0, old)


def _broken_process(chosen: str) -> str | None:
    """A skipped step: the middle step is dropped (the first of two), so the reasoning jumps to the result."""
    solution = _Solution.parse(chosen)
    if solution is None:
        return None
    if len(solution.steps) >= 3:
        del solution.steps[len(solution.steps) // 2]
    elif len(solution.steps) == 2:
        del solution.steps[0]
    else:
        solution.steps = ["1. From the figure, the result follows directly.\n"]
    return solution.render()


_RULES: dict[str, Callable[[str], str | None]] = {
    "calculation_error": _calculation_error,
    "misapplied_concept": _misapplied_concept,
    "broken_process": _broken_process,
}


def rule_flaw(chosen: str, strategy: str) -> str | None:
    """A deterministic flawed version of `chosen` that passes `rejected_problems`, or None when the rule cannot."""
    flawed = _RULES[strategy](chosen)
    if flawed is None or rejected_problems(flawed, chosen, strategy):
        return None
    return flawed
