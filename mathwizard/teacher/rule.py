"""The offline rule teacher: a deterministic rewrite of an MM_Math solution into our answer format.

MM_Math solutions read like `\\textbf{Solution:} $\\because AB=AC$, \\\\ $\\therefore \\angle B=\\angle C$ ...
=\\boxed{40^\\circ}$.` The rule teacher strips the header, splits at LaTeX line breaks (`\\\\`), blank lines and
the connectives `\\because`/`\\therefore`/"Therefore"/"Hence"/..., numbers the pieces, and ends with the source's own
final answer, so its output always agrees with the source. A split that falls inside `$...$` closes the math
before the break and reopens it after, so every step stays valid LaTeX; breaks inside braces and environments
(`\\begin{cases} a \\\\ b \\end{cases}`) are left alone.
"""

from __future__ import annotations

import re

from mathwizard.answers import FINAL_HEADER, SOLUTION_HEADER, final_answer

RULE_VERSION = 1  # bump when the output changes; part of the teach stage's fingerprint
MODEL_NAME = "rule"

_HEADER = re.compile(
    r"^\s*(?:"
    r"\\textbf\s*\{\s*(?:Solution|Answer|Analysis|Proof|Detailed Solution)\s*[:：.]?\s*\}\s*[:：.]?"
    r"|\*\*\s*(?:Solution|Answer)\s*[:：]?\s*\*\*\s*[:：]?"
    r"|(?:Solution|Answer|Detailed Solution)\s*[:：]"
    r"|【(?:解答|详解|解析|答案)】|解\s*[:：]"
    r")\s*",
    re.IGNORECASE,
)
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
# Connectives that start a new step; LaTeX ones anywhere at the top level, words only after a sentence ends.
_LATEX_CONNECTIVES = ("\\therefore", "\\because")
_WORD_CONNECTIVE = re.compile(r"(?:Therefore|Hence|Thus|So|Since|Because|Then)\b")
_SENTENCE_END = re.compile(r"[.;:。；：]\s*$")
_EMPTY_MATH = re.compile(r"\\\(\s*\\\)|\\\[\s*\\\]")
_EDGE_PUNCT = " \t,;，；、"
_LEADING_SPACE_IN_MATH = re.compile(r"^(\$\$|\$|\\\(|\\\[)\s+")
_TRAILING_PUNCT_IN_MATH = re.compile(r"\s*[,;，；]\s*(\$\$|\$|\\\)|\\\])$")


class RuleError(ValueError):
    """The source solution cannot be rewritten (it states no boxed final answer)."""


def rewrite(solution: str) -> str:
    """Our answer format for `solution`: numbered steps from its pieces, then its own final answer.

    Raises:
        RuleError: the solution has no `\\boxed{...}` answer to end with.
    """
    answer = final_answer(solution)
    if answer is None:
        raise RuleError("the source solution has no \\boxed{...} final answer")
    body = _HEADER.sub("", _unbox(solution).strip(), count=1)
    steps = _clean(_split(body))
    if not steps:
        steps = ["The answer follows directly from the given conditions."]
    lines = [
        SOLUTION_HEADER,
        *(f"{i}. {step}" for i, step in enumerate(steps, 1)),
        FINAL_HEADER,
        f"\\boxed{{{answer}}}",
    ]
    return "\n".join(lines)


def _unbox(text: str) -> str:
    """`\\boxed{x}` -> `x` everywhere: the answer appears boxed once, in the final block."""
    out: list[str] = []
    pos = 0
    for match in _BOXED.finditer(text):
        if match.start() < pos:
            continue
        depth, i = 1, match.end()
        while i < len(text) and depth:
            if text[i] == "{" and text[i - 1] != "\\":
                depth += 1
            elif text[i] == "}" and text[i - 1] != "\\":
                depth -= 1
            i += 1
        if depth:  # unbalanced: leave the rest alone
            break
        out.append(text[pos : match.start()])
        out.append(text[match.end() : i - 1])
        pos = i
    out.append(text[pos:])
    return "".join(out)


def _split(text: str) -> list[str]:
    """Pieces of `text` at top-level line breaks and connectives, with math delimiters re-balanced."""
    pieces: list[str] = []
    current: list[str] = []
    math: tuple[str, str] | None = None  # (opener, closer) of the math mode we are in
    depth = 0  # braces
    env = 0  # \begin{...} nesting

    math_at = 0  # index in `current` of the open math's opener

    def cut() -> None:
        nonlocal math_at
        piece = "".join(current)
        if math is not None:
            inner = "".join(current[math_at + 1 :])
            piece = piece + math[1] if inner.strip() else "".join(current[:math_at])
        pieces.append(piece)
        current.clear()
        if math is not None:
            current.append(math[0])
            math_at = 0

    def has_content() -> bool:
        return bool("".join(current).strip(_EDGE_PUNCT + "$"))

    i, n = 0, len(text)
    while i < n:
        # Never split display math or environments: their `\\` are rows, not steps.
        top = depth == 0 and env == 0 and (math is None or math[0] in ("$", "\\("))
        if text.startswith("\\\\", i):
            if top:
                cut()
            else:
                current.append("\\\\")
            i += 2
            continue
        if text.startswith("\\begin{", i):
            env += 1
        elif text.startswith("\\end{", i):
            env = max(0, env - 1)
        if top and text.startswith(_LATEX_CONNECTIVES, i) and has_content():
            cut()
        if text[i] == "\\":  # a command or escaped character: copy it whole
            match = re.match(r"\\(?:[A-Za-z]+|.)", text[i:])
            token = match.group(0) if match else "\\"
            if token in ("\\(", "\\[") and math is None:
                math = (token, "\\)" if token == "\\(" else "\\]")
                math_at = len(current)
            elif math is not None and token == math[1]:
                math = None
            current.append(token)
            i += len(token)
            continue
        char = text[i]
        if char == "$":
            token = "$$" if text.startswith("$$", i) else "$"
            if math is None:
                math = (token, token)
                math_at = len(current)
            elif math[1] == token:
                math = None
            current.append(token)
            i += len(token)
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth = max(0, depth - 1)
        elif char == "\n" and top and text.startswith("\n", i + 1) and math is None:
            cut()  # a blank line ends a paragraph
            i += 2
            continue
        if (
            top
            and math is None
            and char.isupper()
            and _WORD_CONNECTIVE.match(text, i)
            and (i == 0 or not text[i - 1].isalnum())
            and _SENTENCE_END.search("".join(current))
            and has_content()
        ):
            cut()
        current.append(char)
        i += 1
    if math is not None:
        cut()  # unbalanced source: close the math it left open
    else:
        pieces.append("".join(current))
    return pieces


def _clean(pieces: list[str]) -> list[str]:
    """Tidy pieces into steps; a piece that is only a connective is glued to the next one."""
    steps: list[str] = []
    carry = ""
    for raw in pieces:
        piece = " ".join(_EMPTY_MATH.sub(" ", raw).split()).strip(_EDGE_PUNCT)
        piece = _LEADING_SPACE_IN_MATH.sub(r"\1", _TRAILING_PUNCT_IN_MATH.sub(r"\1", piece))
        if not piece:
            continue
        bare = re.sub(r"\\(?:therefore|because)|[$\s.,;:]", "", piece)
        if not bare:
            carry = f"{carry} {piece}".strip()
            continue
        steps.append(f"{carry} {piece}".strip() if carry else piece)
        carry = ""
    if carry:
        steps.append(carry)
    return steps
