"""Regenerate the bundled MM_Math-format sample: 60 geometry problems with figures drawn here with PIL.

Usage: `.venv/bin/python scripts/make_sample.py [OUT_DIR]` (default: the package's `mathwizard/data/sample/` folder).
The output is deterministic (fixed seed, fixed drawing order), so re-running it reproduces the same files.
Problems follow MM_Math's fields and style: LaTeX questions, `\\textbf{Solution:} ... \\\\ ... \\boxed{...}`
solutions whose final answers are computed from the same numbers the figure shows.
"""

from __future__ import annotations

import itertools
import json
import math
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

SEED = 57  # chosen so the default 90/5/5 split gives val and test >= 3 rows each (51 / 4 / 5)
SAMPLE_DIR = Path(__file__).resolve().parents[1] / "mathwizard" / "data" / "sample"
JSONL_NAME = "mm_math_sample.jsonl"
IMAGES_NAME = "images"
WIDTHS = (220, 300, 380, 460, 560, 700, 900)  # some exceed the default 512 px, so resizing is exercised

Point = tuple[float, float]


@dataclass
class Figure:
    """A figure in abstract coordinates (y up); `render` fits it into the image."""

    points: dict[str, Point] = field(default_factory=dict)
    segments: list[tuple[str, str]] = field(default_factory=list)
    dashed: list[tuple[str, str]] = field(default_factory=list)
    circles: list[tuple[str, float]] = field(default_factory=list)
    right_angles: list[tuple[str, str, str]] = field(default_factory=list)  # vertex, arm, arm
    labels: dict[str, Point] = field(default_factory=dict)  # label -> direction from its point
    texts: list[tuple[Point, str]] = field(default_factory=list)  # free text at a position
    lines: list[tuple[Point, Point]] = field(default_factory=list)  # raw segments between coordinates


@dataclass
class Problem:
    question: str
    solution: str
    year: str
    difficult: str
    knowledge: str
    figure: Figure


# ------------------------------------------------------------------------------------------- drawing
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def render(fig: Figure, width: int, mode: str) -> Image.Image:
    """Draw `fig` into an image `width` pixels wide, then convert to `mode` (MM_Math mixes modes)."""
    xs = [p[0] for p in fig.points.values()]
    ys = [p[1] for p in fig.points.values()]
    for name, radius in fig.circles:
        cx, cy = fig.points[name]
        xs += [cx - radius, cx + radius]
        ys += [cy - radius, cy + radius]
    for a, b in fig.lines:
        xs += [a[0], b[0]]
        ys += [a[1], b[1]]
    min_x, max_x, min_y, max_y = min(xs), max(xs), min(ys), max(ys)
    span_x, span_y = max(max_x - min_x, 1e-6), max(max_y - min_y, 1e-6)
    margin = max(18, width // 10)
    scale = (width - 2 * margin) / span_x
    height = max(int(span_y * scale) + 2 * margin, 2 * margin + 10)
    if height > 1.6 * width:  # tall figures: fit the height instead
        height = int(1.6 * width)
        scale = (height - 2 * margin) / span_y
    line = max(1, width // 220)
    font = _font(max(10, width // 22))

    def at(p: Point) -> tuple[float, float]:
        return (margin + (p[0] - min_x) * scale, height - margin - (p[1] - min_y) * scale)

    transparent = mode == "RGBA"
    img = Image.new("RGBA" if transparent else "RGB", (width, height), (255, 255, 255, 0 if transparent else 255))
    draw = ImageDraw.Draw(img)
    ink = (20, 20, 20, 255)
    accent = (30, 60, 200, 255) if mode == "RGB" else ink
    for name, radius in fig.circles:
        cx, cy = at(fig.points[name])
        r = radius * scale
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=ink, width=line)
    for a, b in fig.segments:
        draw.line((at(fig.points[a]), at(fig.points[b])), fill=ink, width=line)
    for a, b in fig.lines:
        draw.line((at(a), at(b)), fill=ink, width=line)
    for a, b in fig.dashed:
        (x0, y0), (x1, y1) = at(fig.points[a]), at(fig.points[b])
        steps = max(2, int(math.hypot(x1 - x0, y1 - y0) // 8))
        for i in range(0, steps, 2):
            t0, t1 = i / steps, min((i + 1) / steps, 1.0)
            draw.line((x0 + (x1 - x0) * t0, y0 + (y1 - y0) * t0, x0 + (x1 - x0) * t1, y0 + (y1 - y0) * t1), fill=ink)
    for vertex, arm1, arm2 in fig.right_angles:
        v = at(fig.points[vertex])
        size = max(6, width // 40)
        u1 = _unit(v, at(fig.points[arm1]))
        u2 = _unit(v, at(fig.points[arm2]))
        p1 = (v[0] + u1[0] * size, v[1] + u1[1] * size)
        p2 = (v[0] + u2[0] * size, v[1] + u2[1] * size)
        corner = (p1[0] + u2[0] * size, p1[1] + u2[1] * size)
        draw.line((p1, corner, p2), fill=ink, width=max(1, line - 1))
    for name, (dx, dy) in fig.labels.items():
        x, y = at(fig.points[name])
        offset = font.size if hasattr(font, "size") else 12
        draw.text((x + dx * offset * 0.9, y - dy * offset * 0.9), name, fill=accent, font=font, anchor="mm")
    for pos, text in fig.texts:
        draw.text(at(pos), text, fill=accent, font=font, anchor="mm")
    for name in fig.points:
        if name == "O":
            x, y = at(fig.points[name])
            draw.ellipse((x - line - 1, y - line - 1, x + line + 1, y + line + 1), fill=ink)
    if mode == "L":
        return img.convert("L")
    if mode == "P":
        return img.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return img


def _unit(a: tuple[float, float], b: tuple[float, float]) -> tuple[float, float]:
    dx, dy = b[0] - a[0], b[1] - a[1]
    norm = math.hypot(dx, dy) or 1.0
    return dx / norm, dy / norm


def _triangle(a: Point, b: Point, c: Point, labels: tuple[str, str, str] = ("A", "B", "C")) -> Figure:
    pts = dict(zip(labels, (a, b, c), strict=True))
    cx, cy = (a[0] + b[0] + c[0]) / 3, (a[1] + b[1] + c[1]) / 3
    fig = Figure(points=pts, segments=[(labels[0], labels[1]), (labels[1], labels[2]), (labels[2], labels[0])])
    for name, (x, y) in pts.items():
        fig.labels[name] = _unit((cx, cy), (x, y))
    return fig


def _on_circle(radius: float, degrees: float) -> Point:
    return (radius * math.cos(math.radians(degrees)), radius * math.sin(math.radians(degrees)))


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _frac(num: int, den: int) -> str:
    g = math.gcd(num, den)
    num, den = num // g, den // g
    return str(num) if den == 1 else rf"\frac{{{num}}}{{{den}}}"


def _pi(coefficient: int | tuple[int, int]) -> str:
    if isinstance(coefficient, tuple):
        text = _frac(*coefficient)
        return r"\pi" if text == "1" else f"{text}\\pi"
    return r"\pi" if coefficient == 1 else f"{coefficient}\\pi"


# ------------------------------------------------------------------------------------------ problems
TRIPLES = ((3, 4, 5), (6, 8, 10), (5, 12, 13), (8, 15, 17), (9, 12, 15), (7, 24, 25), (12, 16, 20))


def pythagoras(rng: random.Random, i: int) -> Problem:
    a, b, c = TRIPLES[i % len(TRIPLES)]
    fig = _triangle((0, b), (a, 0), (0, 0))
    fig.right_angles.append(("C", "A", "B"))
    return Problem(
        rf"As shown in the figure, in $\triangle ABC$, $\angle C=90^\circ$, $AC={b}$, $BC={a}$. "
        rf"Find the length of $AB$.",
        rf"\textbf{{Solution:}} In $\triangle ABC$, $\angle C=90^\circ$, \\ by the Pythagorean theorem, "
        rf"$AB^2=AC^2+BC^2={b}^2+{a}^2={c * c}$, \\ $\therefore AB=\sqrt{{{c * c}}}=\boxed{{{c}}}$.",
        "eight",
        "medium",
        "Pythagorean theorem",
        fig,
    )


def angle_sum(rng: random.Random, i: int) -> Problem:
    a = rng.randrange(40, 80, 5)
    b = rng.randrange(35, 75, 5)
    c = 180 - a - b
    fig = _triangle((1.0 + 0.1 * i, 2.4), (0, 0), (4, 0))
    return Problem(
        rf"As shown in the figure, in $\triangle ABC$, $\angle A={a}^\circ$, $\angle B={b}^\circ$. "
        rf"Find the measure of $\angle C$.",
        rf"\textbf{{Solution:}} The sum of the interior angles of a triangle is $180^\circ$, \\ "
        rf"$\therefore \angle C=180^\circ-\angle A-\angle B=180^\circ-{a}^\circ-{b}^\circ=\boxed{{{c}^\circ}}$.",
        "seven",
        "easy",
        "Triangle angle sum theorem",
        fig,
    )


def isosceles(rng: random.Random, i: int) -> Problem:
    apex = rng.randrange(30, 120, 4)
    base = (180 - apex) // 2
    half = math.tan(math.radians(apex / 2)) * 3
    fig = _triangle((0, 3), (-half, 0), (half, 0))
    return Problem(
        rf"As shown in the figure, in $\triangle ABC$, $AB=AC$, $\angle A={apex}^\circ$. "
        rf"Find the measure of $\angle B$.",
        rf"\textbf{{Solution:}} $\because AB=AC$, \\ $\therefore \angle B=\angle C$. \\ "
        rf"$\because \angle A+\angle B+\angle C=180^\circ$, \\ "
        rf"$\therefore \angle B=\frac{{1}}{{2}}(180^\circ-{apex}^\circ)=\boxed{{{base}^\circ}}$.",
        "eight",
        "medium",
        "Properties of isosceles triangles; Triangle angle sum theorem",
        fig,
    )


def inscribed_angle(rng: random.Random, i: int) -> Problem:
    half = rng.randrange(25, 75, 5)
    start = 200 + rng.randrange(0, 30, 5)
    fig = Figure(points={"O": (0, 0), "A": _on_circle(1, start), "B": _on_circle(1, start + 2 * half)})
    fig.points["C"] = _on_circle(1, start + 2 * half + (360 - 2 * half) / 2)
    fig.circles.append(("O", 1))
    fig.segments += [("O", "A"), ("O", "B"), ("C", "A"), ("C", "B")]
    fig.labels = {k: _unit((0, 0), v) if k != "O" else (0.6, -0.6) for k, v in fig.points.items()}
    return Problem(
        rf"As shown in the figure, points $A$, $B$, $C$ lie on $\odot O$, and $\angle AOB={2 * half}^\circ$. "
        rf"Find the measure of $\angle ACB$.",
        rf"\textbf{{Solution:}} $\angle ACB$ and $\angle AOB$ subtend the same arc $\overset{{\frown}}{{AB}}$, \\ "
        rf"by the inscribed angle theorem, $\angle ACB=\frac{{1}}{{2}}\angle AOB$, \\ "
        rf"$\therefore \angle ACB=\frac{{1}}{{2}}\times {2 * half}^\circ=\boxed{{{half}^\circ}}$.",
        "nine",
        "medium",
        "Inscribed angle theorem",
        fig,
    )


def triangle_area(rng: random.Random, i: int) -> Problem:
    base = rng.randrange(6, 16, 2)
    height = rng.randrange(3, 11)
    foot = base * rng.choice((0.3, 0.4, 0.55, 0.65))
    fig = _triangle((foot, height), (0, 0), (base, 0))
    fig.points["D"] = (foot, 0)
    fig.dashed.append(("A", "D"))
    fig.right_angles.append(("D", "A", "C"))
    fig.labels["D"] = (0, -1)
    area = base * height / 2
    return Problem(
        rf"As shown in the figure, in $\triangle ABC$, $AD\perp BC$ at point $D$, $BC={base}$, $AD={height}$. "
        rf"Find the area of $\triangle ABC$.",
        rf"\textbf{{Solution:}} $\because AD\perp BC$, \\ $\therefore AD$ is the height on side $BC$, \\ "
        rf"$\therefore S_{{\triangle ABC}}=\frac{{1}}{{2}}\cdot BC\cdot AD=\frac{{1}}{{2}}\times {base}\times {height}"
        rf"=\boxed{{{_num(area)}}}$.",
        "seven",
        "medium",
        "Area of a triangle",
        fig,
    )


def annulus(rng: random.Random, i: int) -> Problem:
    big = rng.randrange(5, 11)
    small = rng.randrange(2, big - 1)
    fig = Figure(points={"O": (0, 0), "A": (big, 0), "B": _on_circle(small, 120)})
    fig.circles += [("O", big), ("O", small)]
    fig.segments += [("O", "A"), ("O", "B")]
    fig.labels = {"O": (-0.6, -0.6), "A": (1, 0), "B": (-0.5, 0.8)}
    return Problem(
        rf"As shown in the figure, two concentric circles have center $O$, $OA={big}$ and $OB={small}$. "
        rf"Find the area of the ring between the two circles. (Leave the answer in terms of $\pi$.)",
        rf"\textbf{{Solution:}} The area of the larger circle is $\pi\cdot OA^2={big * big}\pi$, \\ "
        rf"the area of the smaller circle is $\pi\cdot OB^2={small * small}\pi$, \\ "
        rf"$\therefore S_{{\text{{ring}}}}={big * big}\pi-{small * small}\pi"
        rf"=\boxed{{{_pi(big * big - small * small)}}}$.",
        "nine",
        "medium",
        "Area of a circle",
        fig,
    )


def parallel_lines(rng: random.Random, i: int) -> Problem:
    x = rng.randrange(40, 140, 5)
    slope = 1 / math.tan(math.radians(x))
    fig = Figure(
        points={"A": (0, 2), "B": (6, 2), "C": (0, 0), "D": (6, 0), "E": (3 - 1.6 * slope, 3.6)},
    )
    fig.points["F"] = (3 + 1.6 * slope, -1.6)
    fig.points["G"] = (fig.points["E"][0] + (fig.points["F"][0] - fig.points["E"][0]) * (1.6 / 5.2), 2)
    fig.points["H"] = (fig.points["E"][0] + (fig.points["F"][0] - fig.points["E"][0]) * (3.6 / 5.2), 0)
    fig.segments += [("A", "B"), ("C", "D"), ("E", "F")]
    fig.labels = {"A": (-1, 0), "B": (1, 0), "C": (-1, 0), "D": (1, 0), "E": (0, 1), "F": (0, -1)}
    gx, hx = fig.points["G"][0], fig.points["H"][0]
    fig.texts += [((gx + 0.45, 2.25), "1"), ((hx + 0.45, 0.3), "2")]
    return Problem(
        rf"As shown in the figure, $AB\parallel CD$, and line $EF$ intersects $AB$ and $CD$. If $\angle 1={x}^\circ$, "
        rf"find the measure of $\angle 2$.",
        rf"\textbf{{Solution:}} $\because AB\parallel CD$, \\ $\therefore \angle 1+\angle 2=180^\circ$ "
        rf"(same-side interior angles are supplementary), \\ "
        rf"$\therefore \angle 2=180^\circ-{x}^\circ=\boxed{{{180 - x}^\circ}}$.",
        "seven",
        "medium",
        "Properties of parallel lines",
        fig,
    )


def exterior_angle(rng: random.Random, i: int) -> Problem:
    a = rng.randrange(40, 75, 5)
    b = rng.randrange(35, 70, 5)
    fig = _triangle((1.2, 2.6), (0, 0), (3.2, 0))
    fig.points["D"] = (5, 0)
    fig.segments.append(("C", "D"))
    fig.labels["D"] = (0.3, -1)
    return Problem(
        rf"As shown in the figure, $D$ is a point on the extension of side $BC$ of $\triangle ABC$, "
        rf"$\angle ACD={a + b}^\circ$, $\angle A={a}^\circ$. Find the measure of $\angle B$.",
        rf"\textbf{{Solution:}} $\angle ACD$ is an exterior angle of $\triangle ABC$, \\ "
        rf"$\therefore \angle ACD=\angle A+\angle B$, \\ "
        rf"$\therefore \angle B=\angle ACD-\angle A={a + b}^\circ-{a}^\circ=\boxed{{{b}^\circ}}$.",
        "eight",
        "medium",
        "Exterior angle theorem of triangles",
        fig,
    )


def trapezoid(rng: random.Random, i: int) -> Problem:
    top = rng.randrange(3, 9)
    bottom = top + rng.randrange(2, 8)
    height = rng.randrange(3, 9)
    shift = (bottom - top) * rng.choice((0.3, 0.5, 0.7))
    fig = Figure(points={"A": (shift, height), "D": (shift + top, height), "B": (0, 0), "C": (bottom, 0)})
    fig.points["E"] = (shift, 0)
    fig.segments += [("A", "D"), ("D", "C"), ("C", "B"), ("B", "A")]
    fig.dashed.append(("A", "E"))
    fig.right_angles.append(("E", "A", "C"))
    fig.labels = {"A": (-0.5, 0.8), "D": (0.5, 0.8), "B": (-0.8, -0.6), "C": (0.8, -0.6), "E": (0, -1)}
    area = (top + bottom) * height / 2
    return Problem(
        rf"As shown in the figure, in trapezoid $ABCD$, $AD\parallel BC$, $AE\perp BC$ at $E$, $AD={top}$, "
        rf"$BC={bottom}$, $AE={height}$. Find the area of trapezoid $ABCD$.",
        rf"\textbf{{Solution:}} $\because AD\parallel BC$ and $AE\perp BC$, \\ $\therefore AE$ is the height of the "
        rf"trapezoid, \\ $\therefore S=\frac{{1}}{{2}}(AD+BC)\cdot AE=\frac{{1}}{{2}}\times({top}+{bottom})\times "
        rf"{height}=\boxed{{{_num(area)}}}$.",
        "eight",
        "medium",
        "Area of a trapezoid",
        fig,
    )


def similar_triangles(rng: random.Random, i: int) -> Problem:
    ad = rng.randrange(2, 7)
    db = rng.randrange(1, 6)
    bc = rng.randrange(5, 16)
    fig = _triangle((1.6, 4), (0, 0), (5, 0))
    t = ad / (ad + db)
    fig.points["D"] = (1.6 * (1 - t), 4 * (1 - t))
    fig.points["E"] = (1.6 + (5 - 1.6) * t, 4 * (1 - t))
    fig.segments.append(("D", "E"))
    fig.labels["D"] = (-1, 0.2)
    fig.labels["E"] = (1, 0.2)
    answer = _frac(ad * bc, ad + db)
    return Problem(
        rf"As shown in the figure, in $\triangle ABC$, points $D$ and $E$ lie on $AB$ and $AC$ respectively, "
        rf"$DE\parallel BC$, $AD={ad}$, $DB={db}$, $BC={bc}$. Find the length of $DE$.",
        rf"\textbf{{Solution:}} $\because DE\parallel BC$, \\ $\therefore \triangle ADE\sim\triangle ABC$, \\ "
        rf"$\therefore \frac{{DE}}{{BC}}=\frac{{AD}}{{AB}}=\frac{{{ad}}}{{{ad}+{db}}}=\frac{{{ad}}}{{{ad + db}}}$, \\ "
        rf"$\therefore DE=\frac{{{ad}}}{{{ad + db}}}\times {bc}=\boxed{{{answer}}}$.",
        "nine",
        "hard",
        "Similar triangles; Parallel lines dividing segments proportionally",
        fig,
    )


CHORDS = ((5, 3, 8), (13, 5, 24), (10, 6, 16), (10, 8, 12), (17, 8, 30), (25, 7, 48))


def chord(rng: random.Random, i: int) -> Problem:
    r, d, length = CHORDS[i % len(CHORDS)]
    half = length / 2
    fig = Figure(points={"O": (0, 0), "A": (-half, -d), "B": (half, -d), "M": (0, -d)})
    fig.circles.append(("O", r))
    fig.segments += [("A", "B"), ("O", "A")]
    fig.dashed.append(("O", "M"))
    fig.right_angles.append(("M", "O", "B"))
    fig.labels = {"O": (0.7, 0.5), "A": (-1, -0.4), "B": (1, -0.4), "M": (0, -1)}
    return Problem(
        rf"As shown in the figure, the radius of $\odot O$ is ${r}$, $AB$ is a chord, $OM\perp AB$ at $M$, and "
        rf"$OM={d}$. Find the length of the chord $AB$.",
        rf"\textbf{{Solution:}} Connect $OA$. $\because OM\perp AB$, \\ $\therefore AM=BM=\frac{{1}}{{2}}AB$ "
        rf"(perpendicular diameter theorem). \\ In right triangle $\triangle AOM$, "
        rf"$AM=\sqrt{{OA^2-OM^2}}=\sqrt{{{r}^2-{d}^2}}={_num(half)}$, \\ "
        rf"$\therefore AB=2AM=\boxed{{{length}}}$.",
        "nine",
        "hard",
        "Perpendicular diameter theorem; Pythagorean theorem",
        fig,
    )


def rectangle_diagonal(rng: random.Random, i: int) -> Problem:
    a, b, c = TRIPLES[(i + 2) % len(TRIPLES)]
    fig = Figure(points={"A": (0, a), "B": (0, 0), "C": (b, 0), "D": (b, a)})
    fig.segments += [("A", "B"), ("B", "C"), ("C", "D"), ("D", "A"), ("A", "C")]
    fig.right_angles.append(("B", "A", "C"))
    fig.labels = {"A": (-0.8, 0.6), "B": (-0.8, -0.6), "C": (0.8, -0.6), "D": (0.8, 0.6)}
    return Problem(
        rf"As shown in the figure, in rectangle $ABCD$, $AB={a}$, $BC={b}$. Find the length of the diagonal $AC$.",
        rf"\textbf{{Solution:}} $\because$ quadrilateral $ABCD$ is a rectangle, \\ $\therefore \angle B=90^\circ$, \\ "
        rf"$\therefore AC=\sqrt{{AB^2+BC^2}}=\sqrt{{{a}^2+{b}^2}}=\boxed{{{c}}}$.",
        "eight",
        "easy" if i % 2 == 0 else "medium",
        "Properties of rectangles; Pythagorean theorem",
        fig,
    )


def tangent(rng: random.Random, i: int) -> Problem:
    p = rng.randrange(20, 60, 2)
    dist = 1 / math.sin(math.radians(p))
    a = _on_circle(1, 90 - p)
    fig = Figure(points={"O": (0, 0), "P": (dist, 0), "A": a})
    fig.circles.append(("O", 1))
    fig.segments += [("O", "P"), ("P", "A"), ("O", "A")]
    fig.right_angles.append(("A", "O", "P"))
    fig.labels = {"O": (-0.7, -0.6), "P": (1, 0), "A": (0.2, 1)}
    return Problem(
        rf"As shown in the figure, $PA$ is tangent to $\odot O$ at point $A$, and $\angle APO={p}^\circ$. "
        rf"Find the measure of $\angle AOP$.",
        rf"\textbf{{Solution:}} $\because PA$ is tangent to $\odot O$ at $A$, \\ $\therefore OA\perp PA$, "
        rf"i.e. $\angle OAP=90^\circ$, \\ $\therefore \angle AOP=90^\circ-\angle APO=90^\circ-{p}^\circ"
        rf"=\boxed{{{90 - p}^\circ}}$.",
        "nine",
        "medium",
        "Properties of tangents",
        fig,
    )


RHOMBI = ((6, 8, 5), (10, 24, 13), (12, 16, 10), (16, 30, 17), (18, 24, 15))


def rhombus(rng: random.Random, i: int) -> Problem:
    ac, bd, side = RHOMBI[i % len(RHOMBI)]
    fig = Figure(points={"A": (-ac / 2, 0), "C": (ac / 2, 0), "B": (0, bd / 2), "D": (0, -bd / 2), "O": (0, 0)})
    fig.segments += [("A", "B"), ("B", "C"), ("C", "D"), ("D", "A"), ("A", "C"), ("B", "D")]
    fig.labels = {"A": (-1, 0), "C": (1, 0), "B": (0, 1), "D": (0, -1), "O": (0.6, 0.6)}
    return Problem(
        rf"As shown in the figure, the diagonals $AC$ and $BD$ of rhombus $ABCD$ intersect at $O$, $AC={ac}$, "
        rf"$BD={bd}$. Find the perimeter of rhombus $ABCD$.",
        rf"\textbf{{Solution:}} $\because$ quadrilateral $ABCD$ is a rhombus, \\ $\therefore AC\perp BD$, "
        rf"$OA=\frac{{1}}{{2}}AC={ac // 2}$, $OB=\frac{{1}}{{2}}BD={bd // 2}$, \\ "
        rf"$\therefore AB=\sqrt{{OA^2+OB^2}}=\sqrt{{{ac // 2}^2+{bd // 2}^2}}={side}$, \\ "
        rf"$\therefore$ the perimeter is $4AB=4\times {side}=\boxed{{{4 * side}}}$.",
        "eight",
        "hard",
        "Properties of rhombuses; Pythagorean theorem",
        fig,
    )


def sector(rng: random.Random, i: int) -> Problem:
    r = rng.choice((3, 4, 6, 9, 12))
    theta = rng.choice((60, 90, 120, 150))
    fig = Figure(points={"O": (0, 0), "A": _on_circle(r, 0), "B": _on_circle(r, theta)})
    fig.segments += [("O", "A"), ("O", "B")]
    steps = 24
    arc = [_on_circle(r, theta * k / steps) for k in range(steps + 1)]
    fig.lines += list(itertools.pairwise(arc))
    fig.labels = {"O": (-0.7, -0.6), "A": (1, -0.3), "B": _unit((0, 0), fig.points["B"])}
    return Problem(
        rf"As shown in the figure, the radius of sector $AOB$ is ${r}$ and its central angle "
        rf"$\angle AOB={theta}^\circ$. Find the length of arc $\overset{{\frown}}{{AB}}$. "
        rf"(Leave the answer in terms of $\pi$.)",
        rf"\textbf{{Solution:}} The arc length formula is $l=\frac{{n\pi r}}{{180}}$, \\ "
        rf"$\therefore l=\frac{{{theta}\times\pi\times {r}}}{{180}}=\boxed{{{_pi((theta * r, 180))}}}$.",
        "nine",
        "medium",
        "Arc length formula",
        fig,
    )


TEMPLATES: tuple[Callable[[random.Random, int], Problem], ...] = (
    pythagoras,
    angle_sum,
    isosceles,
    inscribed_angle,
    triangle_area,
    annulus,
    parallel_lines,
    exterior_angle,
    trapezoid,
    similar_triangles,
    chord,
    rectangle_diagonal,
    tangent,
    rhombus,
    sector,
)
PER_TEMPLATE = 4  # 15 templates x 4 = 60 problems


def problems() -> list[Problem]:
    rng = random.Random(SEED)
    out: list[Problem] = []
    for i in range(PER_TEMPLATE):
        for template in TEMPLATES:
            problem = template(rng, i)
            while any(p.question == problem.question for p in out):  # redraw the numbers: no repeated problems
                problem = template(rng, i)
            out.append(problem)
    rng.shuffle(out)
    return out


def write_sample(out: Path = SAMPLE_DIR) -> int:
    """Write `mm_math_sample.jsonl` and `images/*.png` under `out`; returns the number of problems."""
    rng = random.Random(SEED + 1)
    images = out / IMAGES_NAME
    images.mkdir(parents=True, exist_ok=True)
    for old in images.glob("*.png"):
        old.unlink()
    lines = []
    for n, problem in enumerate(problems(), start=1):
        file_name = f"{n:04d}.png"
        # MM_Math's figures come in several modes; most are grey line drawings.
        mode = "P" if n % 10 == 3 else "RGBA" if n % 10 == 7 else "RGB" if n % 5 == 0 else "L"
        render(problem.figure, rng.choice(WIDTHS), mode).save(images / file_name, optimize=True)
        row = {
            "question": problem.question,
            "file_name": file_name,
            "solution": problem.solution,
            "year": problem.year,
            "difficult": problem.difficult,
            "knowledge": problem.knowledge,
        }
        lines.append(json.dumps(row, ensure_ascii=False))
    (out / JSONL_NAME).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return len(lines)


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else SAMPLE_DIR
    print(f"wrote {write_sample(target)} problems to {target}")
