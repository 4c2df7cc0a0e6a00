"""Cleaning: every bad-input kind is quarantined with its reason; every PIL mode becomes RGB; sizes are capped."""

from __future__ import annotations

import io
import json
import os
import zlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mathwizard.data.clean import (
    Reason,
    RowError,
    check_lengths,
    clean_dataset,
    clean_image,
    clean_images,
    normalize_row,
    read_records,
    resolve_image,
    to_rgb,
)
from mathwizard.errors import DataError
from tests.datasrc.mm_math_builders import draw_figure, good_row, write_jsonl

BIG = 10**8


def _decode(png: bytes | None) -> Image.Image:
    assert png is not None
    img = Image.open(io.BytesIO(png))
    assert img.format == "PNG"
    return img


# ------------------------------------------------------------------------------------------- modes
def _mode_image(mode: str) -> Image.Image:
    if mode == "RGBA":
        return Image.new("RGBA", (4, 3), (255, 0, 0, 0))  # fully transparent red -> white
    if mode == "LA":
        return Image.new("LA", (4, 3), (0, 0))
    if mode == "P":
        img = Image.new("P", (4, 3), 1)
        img.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
        return img
    if mode == "P-transparent":
        img = Image.new("P", (4, 3), 0)
        img.putpalette([0, 0, 0] * 256)
        img.info["transparency"] = 0
        return img
    if mode == "I;16":
        return Image.fromarray(np.full((3, 4), 65535, dtype=np.uint16))
    if mode == "I":
        return Image.fromarray(np.full((3, 4), 4_000_000, dtype=np.int32))
    if mode == "F":
        return Image.fromarray(np.full((3, 4), 0.0, dtype=np.float32))
    if mode == "CMYK":
        return Image.new("CMYK", (4, 3), (0, 255, 0, 0))
    if mode == "1":
        return Image.new("1", (4, 3), 1)
    return Image.new(mode, (4, 3), 0)


@pytest.mark.parametrize(
    ("mode", "pixel"),
    [
        ("RGBA", (255, 255, 255)),  # transparency composited over white, not black
        ("LA", (255, 255, 255)),
        ("P", (10, 20, 30)),
        ("P-transparent", (255, 255, 255)),
        ("L", (0, 0, 0)),
        ("I;16", (255, 255, 255)),  # 65535 of 16 bits is full white, not clipped garbage
        ("I", (0, 0, 0)),  # constant out-of-range values: stretched from their own minimum
        ("F", (0, 0, 0)),
        ("CMYK", (255, 0, 255)),  # pure magenta ink (C=0 M=255 Y=0 K=0)
        ("1", (255, 255, 255)),
        ("RGB", (0, 0, 0)),
    ],
)
def test_every_mode_becomes_rgb(mode: str, pixel: tuple[int, int, int]) -> None:
    rgb = to_rgb(_mode_image(mode))
    assert rgb.mode == "RGB" and rgb.size == (4, 3)
    assert rgb.getpixel((0, 0)) == pixel


def test_16_bit_greys_are_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 65535], [32896, 256]], dtype=np.uint16)
    path = tmp_path / "grey16.png"
    Image.fromarray(values).save(path)
    img = _decode(clean_image(str(path), 512, BIG).png)
    # v / 257 rounded: 0 -> 0, 65535 -> 255, 32896 -> 128, 256 -> 1
    assert np.asarray(img)[..., 0].tolist() == [[0, 255], [128, 1]]


@pytest.mark.parametrize("mode", ["RGBA", "P", "L", "LA", "CMYK", "I;16", "1", "RGB"])
def test_saved_files_of_every_mode_clean_to_rgb_png(tmp_path: Path, mode: str) -> None:
    path = tmp_path / ("figure.jpg" if mode == "CMYK" else "figure.png")  # PNG cannot store CMYK
    _mode_image(mode).save(path)
    result = clean_image(str(path), 512, BIG)
    assert result.reason is None
    assert _decode(result.png).mode == "RGB"


# ------------------------------------------------------------------------------------------- sizes
@pytest.mark.parametrize(
    ("size", "max_size", "expected"),
    [
        ((1000, 250), 512, (512, 128)),  # longest side to 512, aspect 4:1 kept
        ((250, 1000), 512, (128, 512)),
        ((8920, 30), 512, (512, 2)),  # MM_Math's widest figure: 30 * 512 / 8920 = 1.72 -> 2
        ((5, 3), 512, (5, 3)),  # tiny figures are never enlarged
        ((600, 400), 128, (128, 85)),  # 400 * 128 / 600 = 85.3
        ((512, 100), 512, (512, 100)),  # exactly at the limit: untouched
    ],
)
def test_resize_keeps_aspect(tmp_path: Path, size, max_size, expected) -> None:
    path = draw_figure(tmp_path / "f.png", size)
    result = clean_image(str(path), max_size, BIG)
    assert result.size == expected == _decode(result.png).size
    assert result.original_size == size


def test_jpeg_and_exif_rotation(tmp_path: Path) -> None:
    img = Image.new("RGB", (40, 20), "white")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise on display
    img.save(tmp_path / "photo.jpg", exif=exif)
    assert _decode(clean_image(str(tmp_path / "photo.jpg"), 512, BIG).png).size == (20, 40)


# --------------------------------------------------------------------------------------- bad files
def _truncated_png(path: Path) -> Path:
    Image.effect_noise((64, 64), 60).convert("RGB").save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda p: _truncated_png(p), Reason.IMAGE_TRUNCATED),
        (lambda p: p.write_bytes(os.urandom(300)), Reason.IMAGE_CORRUPT),
        (lambda p: p.write_bytes(b""), Reason.IMAGE_CORRUPT),
        (lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40), Reason.IMAGE_CORRUPT),
        # 1-bit images compress to almost nothing, yet decode to width x height pixels.
        (lambda p: Image.new("1", (1500, 1000)).save(p), Reason.IMAGE_TOO_LARGE),  # 1.5 M > 1 M: our check
        (lambda p: Image.new("1", (3000, 1000)).save(p), Reason.IMAGE_TOO_LARGE),  # 3 M > 2 x 1 M: PIL's own guard
    ],
    ids=["truncated", "random-bytes", "empty", "png-header-only", "bomb", "bomb-over-pil-limit"],
)
def test_bad_files_are_rejected_with_a_reason(tmp_path: Path, make, reason: Reason) -> None:
    path = tmp_path / "bad.png"
    make(path)
    result = clean_image(str(path), 512, 1_000_000)
    assert result.png is None
    assert result.reason == reason and result.detail


def test_pil_limit_is_restored_after_each_image(tmp_path: Path) -> None:
    before = Image.MAX_IMAGE_PIXELS
    clean_image(str(draw_figure(tmp_path / "ok.png")), 512, 1234)
    assert before == Image.MAX_IMAGE_PIXELS


def test_decompression_bomb_in_a_deflate_stream(tmp_path: Path) -> None:
    """A hand-made PNG header claiming 20000 x 20000 pixels is refused before anything is inflated."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    header = (20000).to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0])  # 8-bit grey
    path = tmp_path / "bomb.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 1000)))
    result = clean_image(str(path), 512, 64_000_000)
    assert result.reason == Reason.IMAGE_TOO_LARGE  # 400 M pixels > 64 M


# ------------------------------------------------------------------------------------------ records
def test_read_records_reports_every_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_bytes(
        json.dumps(good_row(1)).encode() + b"\n"  # line 1 ok
        b"\n"  # line 2 blank: not a row
        b"{not json\n"  # line 3
        b"[1, 2]\n"  # line 4: valid JSON, not an object
        b'{"question": "\xff\xfe"}\n'  # line 5: not UTF-8
         + json.dumps(good_row(2)).encode()  # line 6 ok, no trailing newline
    )
    items = list(read_records(path))
    assert [line for line, _ in items] == [1, 3, 4, 5, 6]
    reasons = [getattr(item, "reason", None) for _, item in items]
    assert reasons == [None, Reason.MALFORMED_JSON, Reason.NOT_AN_OBJECT, Reason.MALFORMED_JSON, None]
    assert [line for line, _ in read_records(path, limit=2)] == [1, 3]


def test_read_records_json_list_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "MM_Math.json"
    path.write_text(json.dumps({"data": [good_row(1), "oops", good_row(2)]}))
    items = list(read_records(path))
    assert [line for line, _ in items] == [1, 2, 3]
    assert items[1][1].reason == Reason.NOT_AN_OBJECT
    path.write_text("{broken")
    with pytest.raises(DataError, match="not valid JSON"):
        list(read_records(path))
    path.write_text('"just a string"')
    with pytest.raises(DataError, match="no list of rows"):
        list(read_records(path))


def test_normalize_row_fields() -> None:
    legacy = {**good_row(1), "year": 8, "knowledge": ["Angles", "Triangles"]}
    legacy["image_file_name"] = legacy.pop("file_name")
    row = normalize_row(legacy)
    assert row["file_name"] == "1.png" and row["year"] == "8" and row["knowledge"] == "Angles; Triangles"
    old = {**good_row(2)}
    old["image"] = old.pop("file_name")
    assert normalize_row(old)["file_name"] == "2.png"
    for field, value, reason in [
        ("question", None, Reason.MISSING_FIELD),
        ("solution", "  \n", Reason.BLANK_FIELD),
        ("difficult", {"level": 2}, Reason.MISSING_FIELD),
        ("year", True, Reason.MISSING_FIELD),
    ]:
        with pytest.raises(RowError) as info:
            normalize_row({**good_row(3), field: value})
        assert info.value.reason == reason and field in info.value.detail
    without = good_row(4)
    del without["knowledge"]
    with pytest.raises(RowError, match="knowledge"):
        normalize_row(without)


# ------------------------------------------------------------------------------------------- paths
def test_lengths_over_the_limits_are_too_long() -> None:
    row = {"question": "q" * 10, "solution": "s" * 20}
    check_lengths(row, 10, 20)  # at the limit: kept
    check_lengths(row, None, None)  # no limits
    for limits, detail in (((9, 20), "question is 10 characters"), ((10, 19), "solution is 20 characters")):
        with pytest.raises(RowError) as info:
            check_lengths(row, *limits)
        assert info.value.reason == Reason.TOO_LONG and info.value.detail.startswith(detail)


def test_resolve_image_refuses_to_leave_the_folder(tmp_path: Path) -> None:
    root = tmp_path / "images"
    draw_figure(root / "ok.png")
    draw_figure(root / "sub" / "nested.png")
    draw_figure(tmp_path / "secret.png")
    (root / "link.png").symlink_to(tmp_path / "secret.png")
    (root / "linkdir").symlink_to(tmp_path)
    (root / "folder.png").mkdir()
    assert resolve_image(root, "ok.png") == root / "ok.png"
    assert resolve_image(root, "sub/nested.png") == root / "sub" / "nested.png"
    cases = {
        "../secret.png": Reason.UNSAFE_PATH,
        "sub/../../secret.png": Reason.UNSAFE_PATH,
        "..\\secret.png": Reason.UNSAFE_PATH,
        str(tmp_path / "secret.png"): Reason.UNSAFE_PATH,
        "C:/secret.png": Reason.UNSAFE_PATH,
        "link.png": Reason.UNSAFE_PATH,
        "linkdir/secret.png": Reason.UNSAFE_PATH,
        "ok.png\x00.txt": Reason.UNSAFE_PATH,
        "nope.png": Reason.MISSING_IMAGE,
        "folder.png": Reason.MISSING_IMAGE,
    }
    for name, reason in cases.items():
        with pytest.raises(RowError) as info:
            resolve_image(root, name)
        assert info.value.reason == reason, name


# ---------------------------------------------------------------------------------------- the whole pass
def _dataset_with_every_bad_kind(tmp_path: Path) -> tuple[Path, Path]:
    images = tmp_path / "images"
    rows: list[dict | str] = [good_row(i) for i in range(20)]  # lines 1-20: good
    for row in rows:
        draw_figure(images / row["file_name"], size=(700, 350))
    rows += [
        "{oops",  # 21 malformed_json
        "42",  # 22 not_an_object
        {k: v for k, v in good_row(23).items() if k != "solution"},  # 23 missing_field
        {**good_row(24), "question": "   "},  # 24 blank_field
        good_row(5),  # 25 duplicate of line 6 (good_row(5))
        {**good_row(6), "difficult": "hard"},  # 26 duplicate_id: same question + figure as line 7
        {**good_row(27), "file_name": "../../etc/passwd"},  # 27 unsafe_path
        {**good_row(28), "file_name": "/etc/passwd"},  # 28 unsafe_path
        good_row(29),  # 29 missing_image
        good_row(30),  # 30 image_corrupt
        good_row(31),  # 31 image_truncated
        good_row(32),  # 32 image_too_large
        {**good_row(33), "file_name": "link.png"},  # 33 unsafe_path (symlink)
    ]
    (images / "30.png").write_bytes(b"not an image at all")
    _truncated_png(images / "31.png")
    Image.new("1", (1200, 1000)).save(images / "32.png")  # 1.2 M pixels > the 1 M limit below
    (images / "link.png").symlink_to(images / "0.png")
    return write_jsonl(tmp_path / "MM_Math.jsonl", rows), images


@pytest.mark.parametrize("workers", [1, 2])
def test_clean_dataset_quarantines_every_bad_kind(tmp_path: Path, workers: int) -> None:
    jsonl, images = _dataset_with_every_bad_kind(tmp_path)
    out, quarantine = tmp_path / "clean.parquet", tmp_path / "quarantine.jsonl"
    report = clean_dataset(
        jsonl, images, out, quarantine, salt="s", max_size=512, max_pixels=1_000_000, workers=workers, batch_rows=7
    )
    assert (report.rows_in, report.kept, report.quarantined) == (33, 20, 13)  # 20 good + 13 bad lines
    assert report.resized == 20  # every good figure is 700 px wide
    assert report.by_reason == {
        "malformed_json": 1,
        "not_an_object": 1,
        "missing_field": 1,
        "blank_field": 1,
        "duplicate": 1,
        "duplicate_id": 1,
        "unsafe_path": 3,  # '..', absolute, symlink
        "missing_image": 1,
        "image_corrupt": 1,
        "image_truncated": 1,
        "image_too_large": 1,
    }
    records = [json.loads(line) for line in quarantine.read_text().splitlines()]
    assert [r["line"] for r in records] == list(range(21, 34))
    assert set(records[0]) == {"line", "file_name", "reason", "detail"}
    assert records[4] == {"line": 25, "file_name": "5.png", "reason": "duplicate", "detail": "same as line 6"}
    assert records[6]["file_name"] == "../../etc/passwd"

    table = pq.read_table(out)
    assert table.num_rows == 20 and table.column("file_name").to_pylist() == [f"{i}.png" for i in range(20)]
    first = _decode(table.column("image")[0].as_py()["bytes"])
    assert first.mode == "RGB" and first.size == (512, 256)  # 700 x 350 -> 512 x 256


def test_parallel_and_serial_give_identical_bytes(tmp_path: Path) -> None:
    sizes = [(100 + 37 * i, 80) for i in range(20)]
    paths = [str(draw_figure(tmp_path / f"{i}.png", size, mode="LA" if i % 3 else "P")) for i, size in enumerate(sizes)]
    serial = list(clean_images(paths, 64, BIG, workers=1))
    parallel = list(clean_images(paths, 64, BIG, workers=2))
    assert [r.png for r in serial] == [r.png for r in parallel]
    assert all(r.png for r in parallel)
