"""The answer format every solution follows, and how two final answers are compared.

Format (teacher rewrites, flawed answers, model outputs):

    ### Solution
    1. ...
    2. ...
    ### Final Answer
    \\boxed{...}

MM_Math's source solutions end with `\\boxed{...}` too. Two final answers agree (`answers_match`) when their
normalised spellings are equal (spaces, degree signs, `\\dfrac`/`\\tfrac`/`\\frac`, `\\left`/`\\right`, surrounding
`$`/`\\(`/`\\[`), else when math-verify finds them symbolically equivalent (`1/2`, `\\frac{1}{2}` and `0.5`;
`2\\sqrt{3}` and `\\sqrt{12}`). Multi-part answers (`3, 4` or `x=1; y=2`) agree part by part, in order.

math-verify can take unbounded time on adversarial input (`9^{9^{9^{9}}}`), and its own timeout (SIGALRM) works
only in a main thread, while the teacher validates replies in its event loop's thread. So the symbolic comparison
runs in one helper process per Python process (`python -m mathwizard.answers`, started on first use): there it
runs under math-verify's alarm, and the caller also bounds each comparison and kills a helper that overruns.
A comparison that times out, or a helper that cannot start, counts as "different" (the normaliser's answer).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import select
import subprocess
import sys
import threading
from typing import NamedTuple

log = logging.getLogger(__name__)

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
    """Whether two final answers agree: the same normalised spelling, else symbolically equivalent, part by part."""
    if a is None or b is None:
        return False
    if normalize_answer(a) == normalize_answer(b):
        return True
    parts_a, parts_b = answer_parts(a), answer_parts(b)
    if len(parts_a) != len(parts_b) or not all(normalize_answer(p) for p in parts_a + parts_b):
        return False
    if len(parts_a) > 1:  # ordered: "(1) 3, (2) 4" is not "4, 3", although math-verify would read both as sets
        return all(
            normalize_answer(x) == normalize_answer(y) or symbolic_equal(x, y)
            for x, y in zip(parts_a, parts_b, strict=True)
        )
    return symbolic_equal(a, b)


_SEPARATORS = ",;，；"
_OPENERS, _CLOSERS = "{([", "})]"


def answer_parts(answer: str) -> list[str]:
    """The answer split at commas and semicolons outside any brackets (`(1, 2)` and `\\{1, 2\\}` stay whole)."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(answer):
        if char in _OPENERS:
            depth += 1
        elif char in _CLOSERS:
            depth = max(0, depth - 1)
        elif char in _SEPARATORS and depth == 0:
            parts.append(answer[start:i])
            start = i + 1
    parts.append(answer[start:])
    return [part.strip() for part in parts]


# ------------------------------------------------------------------------------------ symbolic equivalence
SYMBOLIC_TIMEOUT_S = 2  # math-verify's own bound on parsing and on comparing, in the helper (whole seconds: SIGALRM)
CHECK_TIMEOUT_S = 10.0  # the caller's bound on one comparison; past it the helper is killed and restarted
START_TIMEOUT_S = 120.0  # the helper imports sympy; a loaded CI machine may take a while
MAX_SYMBOLIC_CHARS = 300  # longer answers are not parsed (the normaliser decides): sympy's cost grows with length


def _for_math_verify(answer: str) -> str:
    """The answer as math-verify reads it best: one boxed expression, the degree sign spelled in LaTeX."""
    text = answer.strip()
    for old, new in (("°", "^{\\circ}"), ("，", ","), ("：", ":"), ("（", "("), ("）", ")")):
        text = text.replace(old, new)
    return "\\boxed{" + text + "}"


class _Checker:
    """The helper process: one JSON request per line (`[gold, predicted, timeout_s]`), one JSON reply per line."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._process: subprocess.Popen[str] | None = None
        self._broken = False
        atexit.register(self.close)

    def compare(self, gold: str, predicted: str) -> bool:
        with self._lock:
            if self._broken:
                return False
            process = self._process if self._process and self._process.poll() is None else self._start()
            if process is None:
                return False
            try:
                process.stdin.write(json.dumps([gold, predicted, SYMBOLIC_TIMEOUT_S]) + "\n")  # type: ignore[union-attr]
                process.stdin.flush()  # type: ignore[union-attr]
                reply = self._read_line(process, CHECK_TIMEOUT_S)
            except OSError:
                reply = None
            if reply is None:
                log.warning(
                    "comparing %r with %r took over %.0f s; counted as different", predicted[:60], gold[:60],
                    CHECK_TIMEOUT_S,
                )  # fmt: skip
                self._kill()
                return False
            return reply.strip() == "true"

    def _start(self) -> subprocess.Popen[str] | None:
        self._kill()
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", "mathwizard.answers"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
                bufsize=1,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        except OSError as exc:
            return self._give_up(f"{type(exc).__name__}: {exc}")
        if self._read_line(process, START_TIMEOUT_S) != "ready\n":
            process.kill()
            return self._give_up("it did not start (is math-verify installed?)")
        self._process = process
        return process

    def _give_up(self, why: str) -> None:
        log.warning("symbolic answer checking is off (%s): answers are compared by their normalised spelling", why)
        self._broken = True
        return None

    @staticmethod
    def _read_line(process: subprocess.Popen[str], timeout: float) -> str | None:
        ready, _, _ = select.select([process.stdout], [], [], timeout)
        if not ready:
            return None
        line = process.stdout.readline()  # type: ignore[union-attr]
        return line or None

    def _kill(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None

    def close(self) -> None:
        with self._lock:
            self._kill()


_checker = _Checker()


def symbolic_equal(gold: str, predicted: str) -> bool:
    """Whether math-verify finds the two answers equivalent (bounded in time; False when it cannot tell)."""
    if len(gold) > MAX_SYMBOLIC_CHARS or len(predicted) > MAX_SYMBOLIC_CHARS:
        return False
    return _checker.compare(_for_math_verify(gold), _for_math_verify(predicted))


def _serve() -> None:
    """The helper's loop (main thread, so math-verify's alarm works): a reply per request until stdin closes."""
    import logging as _logging

    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    _logging.disable(_logging.CRITICAL)  # math-verify logs every unparsable answer
    extraction = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
    print("ready", flush=True)
    for line in sys.stdin:
        try:
            gold, predicted, timeout_s = json.loads(line)
            parsed_gold = parse(gold, extraction_config=extraction, parsing_timeout=timeout_s)
            parsed_predicted = parse(predicted, extraction_config=extraction, parsing_timeout=timeout_s)
            equal = bool(parsed_gold and parsed_predicted) and verify(
                parsed_gold, parsed_predicted, timeout_seconds=timeout_s
            )
        except Exception:  # a timeout or a parser failure: not shown to be equal
            equal = False
        print("true" if equal else "false", flush=True)


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


if __name__ == "__main__":
    _serve()
