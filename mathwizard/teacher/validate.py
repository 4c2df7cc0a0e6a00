"""Validation of every teacher reply: the answer format, and agreement with the source solution's final answer.

A reply is usable only if it follows the format (`### Solution` numbered steps, `### Final Answer` with one
`\\boxed{}`), was not cut off (`finish_reason == "length"`) or refused, and its boxed answer equals the source's
after normalisation. Anything else is asked again and, after the last attempt, excluded and reported.
"""

from __future__ import annotations

from mathwizard.answers import answers_match, final_answer, format_problems

# Human wording of each problem, fed back to the teacher when it is asked again.
_DESCRIPTIONS = {
    "truncated": "it was cut off at the length limit before it ended; write the steps more briefly",
    "content_filter": "it was withheld by the provider's content filter",
    "refusal": "it refuses instead of rewriting the solution",
    "empty": "it is empty",
    "missing_solution_header": 'it lacks the "### Solution" header',
    "missing_final_answer_header": 'it lacks the "### Final Answer" header',
    "headers_out_of_order": '"### Final Answer" comes before "### Solution"',
    "no_numbered_steps": "the solution has no numbered steps",
    "no_boxed_answer": "it has no \\boxed{...} answer",
    "final_answer_needs_exactly_one_boxed": "the Final Answer section must hold exactly one \\boxed{...}",
    "answer_mismatch": "its final answer differs from the reference solution's",
}


def reply_problems(
    text: str | None, source_answer: str | None, *, finish_reason: str | None = None, refusal: str | None = None
) -> list[str]:
    """Why a reply cannot be used, most telling reason first; empty when it is valid."""
    problems: list[str] = []
    if finish_reason == "length":
        problems.append("truncated")
    elif finish_reason == "content_filter":
        problems.append("content_filter")
    if refusal:
        problems.append("refusal")
    problems += [p for p in format_problems(text or "") if p not in problems]
    answer = final_answer(text or "")
    if answer is not None and not answers_match(answer, source_answer):
        problems.append("answer_mismatch")
    return problems


def describe(problems: list[str]) -> str:
    """The problems as one sentence fragment, e.g. for the re-ask message."""
    return "; ".join(_DESCRIPTIONS.get(p, p.replace("_", " ")) for p in problems)
