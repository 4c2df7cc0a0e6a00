"""The answer format every solution follows, and how two final answers are compared.

Format (teacher rewrites, flawed answers, model outputs):

    ### Solution
    1. ...
    2. ...
    ### Final Answer
    \\boxed{...}

MM_Math's source solutions end with `\\boxed{...}` too. Answers are compared after normalisation (spaces,
degree signs, `\\dfrac`/`\\tfrac`/`\\frac`, `\\left`/`\\right`, surrounding `$`/`\\(`/`\\[`), so a rewrite that only
changes typography still agrees with its source.
"""

from __future__ import annotations

import re
from typing import NamedTuple

SOLUTION_HEADER = "### Solution"
FINAL_HEADER = "### Final Answer"

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_STEP = re.compile(r"^\s*\d+[.)]\s+\S", re.MULTILINE)
_REFUSAL = re.compile(
    r"\b(I (?:can(?:no|')t|am unable to|won't) (?:help|answer|solve|assist)|as an AI (?:language )?model)\b",
    re.IGNORECASE,
)


class Boxed(NamedTuple):
    """One boxed expression: its content is `text[start:end]`, between the braces of `\\boxed{...}`."""

    start: int
    end: int
    content: str


def boxed_spans(text: str) -> list[Boxed]:
    """Every `\\boxed{...}` and `\\fbox{...}` in `text`, in order of their opening.

    Nested braces are kept whole (`\\boxed{\\frac{1}{2}}` holds `\\frac{1}{2}`), escaped braces (`\\{`) do not
    count, and a box whose braces never close is left out. The one brace matcher: answers are read and rule-made
    flaws (`mathwizard.flaws`) edit them through it.
    """
    found: list[Boxed] = []
    for match in _BOXED.finditer(text):
        depth, start = 1, match.end()
        for i in range(start, len(text)):
            char = text[i]
            if char == "{" and text[i - 1] != "\\":
                depth += 1
            elif char == "}" and text[i - 1] != "\\":
                depth -= 1
                if depth == 0:
                    found.append(Boxed(start, i, text[start:i]))
                    break
    return found


def boxed_answers(text: str) -> list[str]:
    """Contents of every boxed expression in order (see `boxed_spans`)."""
    return [box.content for box in boxed_spans(text)]


def final_answer(text: str) -> str | None:
    """The last boxed answer, which is the final one in MM_Math and in our format; None when there is none."""
    spans = boxed_spans(text)
    return spans[-1].content if spans else None


_REPLACEMENTS: tuple[tuple[str, str], ...] = (
    (r"\dfrac", r"\frac"),
    (r"\tfrac", r"\frac"),
    (r"\left", ""),
    (r"\right", ""),
    (r"\!", ""),
    (r"\,", ""),
    (r"\;", ""),
    (r"\:", ""),
    (r"\quad", ""),
    (r"\displaystyle", ""),
    ("^{\\circ}", "°"),
    ("^\\circ", "°"),
    ("\\circ", "°"),
    (r"\degree", "°"),
    ("{}°", "°"),
    (r"\text{cm}", "cm"),
    (r"\mathrm{cm}", "cm"),
    ("，", ","),
    ("：", ":"),
    ("（", "("),
    ("）", ")"),
)


def normalize_answer(answer: str) -> str:
    """A canonical spelling of a final answer, for comparison only."""
    text = answer.strip()
    for opener, closer in (("$$", "$$"), ("$", "$"), (r"\(", r"\)"), (r"\[", r"\]")):
        if text.startswith(opener) and text.endswith(closer) and len(text) >= len(opener) + len(closer):
            text = text[len(opener) : len(text) - len(closer)].strip()
    for old, new in _REPLACEMENTS:
        text = text.replace(old, new)
    text = re.sub(r"\\text\{\s*([^{}]*)\}", r"\1", text)
    text = re.sub(r"\s+", "", text)
    text = text.rstrip(".。")
    # \frac12 -> \frac{1}{2}
    text = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", text)
    return text


def answers_match(a: str | None, b: str | None) -> bool:
    return a is not None and b is not None and normalize_answer(a) == normalize_answer(b)


def format_problems(text: str) -> list[str]:
    """Reasons why `text` does not follow the answer format; empty when it does."""
    problems: list[str] = []
    if not text or not text.strip():
        return ["empty"]
    if _REFUSAL.search(text):
        problems.append("refusal")
    solution_at = text.find(SOLUTION_HEADER)
    final_at = text.find(FINAL_HEADER)
    if solution_at < 0:
        problems.append("missing_solution_header")
    if final_at < 0:
        problems.append("missing_final_answer_header")
    if solution_at >= 0 and final_at >= 0:
        if final_at < solution_at:
            problems.append("headers_out_of_order")
        elif not _STEP.search(text[solution_at:final_at]):
            problems.append("no_numbered_steps")
    boxed_after_final = boxed_answers(text[final_at:]) if final_at >= 0 else []
    if len(boxed_answers(text)) == 0:
        problems.append("no_boxed_answer")
    elif final_at >= 0 and len(boxed_after_final) != 1:
        problems.append("final_answer_needs_exactly_one_boxed")
    return problems


def follows_format(text: str) -> bool:
    return not format_problems(text)
