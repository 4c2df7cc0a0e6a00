"""The splits module: stable split assignment (a row's split depends on its own content only, so growth never moves
a row), and the one way every stage finds, reads and writes its split files."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mathwizard.data.splits import (
    SPLIT_FILES,
    arrow_schema,
    read_dataset,
    read_table,
    row_id,
    split_of,
    split_path,
    split_rows,
    write_table,
)
from mathwizard.errors import DataError

SALT = "mathwizard-split-v1"


def test_row_id_is_deterministic_and_ignores_layout_whitespace() -> None:
    a = row_id(r"Find $\angle C$.", "1.png", SALT)
    assert a == row_id("  Find  $\\angle C$.\n", "1.png ", SALT)
    assert len(a) == 16 and int(a, 16) >= 0
    assert a != row_id(r"Find $\angle C$.", "2.png", SALT)  # another figure is another problem
    assert a != row_id(r"Find $\angle C$.", "1.png", "other-salt")


def test_split_of_cuts_the_unit_interval() -> None:
    fractions = (0.9, 0.05, 0.05)
    assert split_of("0" * 16, fractions) == "train"  # 0.0
    assert split_of("e6" + "0" * 14, fractions) == "train"  # 0xe6 / 256 = 0.898
    assert split_of("e7" + "0" * 14, fractions) == "val"  # 0.902
    assert split_of("f3" + "0" * 14, fractions) == "val"  # 0.949
    assert split_of("f4" + "0" * 14, fractions) == "test"  # 0.953
    assert split_of("f" * 16, fractions) == "test"  # 1 - 2**-52, never rounded up to 1.0
    assert split_of("f" * 16, (1.0, 0.0, 0.0)) == "train"
    assert split_of("0" * 16, (0.0, 0.0, 1.0)) == "test"
    assert split_of("0" * 16, (0.0, 1.0, 0.0)) == "val"  # an empty split never takes a row, even at 0.0
    assert split_of("f" * 16, (0.9999995, 0.0, 0.0)) == "train"  # sums within 1e-6 of 1 still cover [0, 1)


def test_fractions_are_respected_on_many_rows() -> None:
    ids = [row_id(f"question {i}", f"{i}.png", SALT) for i in range(20_000)]
    counts = Counter(split_of(i, (0.9, 0.05, 0.05)) for i in ids)
    # Binomial standard deviations on 20,000 rows: train 42, val/test 31 rows; allow about 4 of them.
    assert abs(counts["train"] - 18_000) < 170
    assert abs(counts["val"] - 1_000) < 125 and abs(counts["test"] - 1_000) < 125


def _png() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (6, 4), (1, 2, 3)).save(buffer, format="PNG")
    return buffer.getvalue()


def _rows(n: int) -> pa.Table:
    """n rows in the prepared schema: `image` an encoded PNG struct, the rest strings."""
    columns = {name: [f"{name}-{i}" for i in range(n)] for name in arrow_schema().names if name != "image"}
    columns["image"] = [{"bytes": _png(), "path": None} for _ in range(n)]
    return pa.Table.from_pydict(columns).select(arrow_schema().names).cast(arrow_schema())


# ---------------------------------------------------------------------------------------------- finding
def test_split_path_knows_teach_and_prepare_names(tmp_path: Path) -> None:
    assert SPLIT_FILES == {
        "train": "train-00000-of-00001.parquet",
        "val": "val-00000-of-00001.parquet",
        "test": "test-00000-of-00001.parquet",
    }
    write_table(tmp_path / SPLIT_FILES["test"], _rows(3))  # prepare's Hub shard name
    write_table(tmp_path / "val.parquet", _rows(1))  # the later stages' name
    assert split_path(tmp_path, "test") == tmp_path / SPLIT_FILES["test"]
    assert split_path(tmp_path, "val") == tmp_path / "val.parquet"
    assert (split_rows(tmp_path, "test"), split_rows(tmp_path, "test", limit=2), split_rows(tmp_path, "val", 5)) == (
        3,
        2,
        1,
    )
    with pytest.raises(DataError) as info:
        split_path(tmp_path, "train")
    assert str(info.value) == (
        f"{tmp_path} has no train.parquet or train-00000-of-00001.parquet; pass a finished stage folder"
        " (run the stage that writes it first)"
    )


# ---------------------------------------------------------------------------------------------- reading
def test_read_table_columns_and_limit(tmp_path: Path) -> None:
    write_table(tmp_path / "train.parquet", _rows(5))
    table = read_table(tmp_path, "train", ["id", "question"], limit=2)
    assert table.column_names == ["id", "question"] and table.column("id").to_pylist() == ["id-0", "id-1"]
    assert read_table(tmp_path, "train").num_rows == 5  # all columns, all rows; images stay encoded
    assert read_table(tmp_path, "train").column("image")[0].as_py()["bytes"][:4] == b"\x89PNG"
    assert read_table(tmp_path, "val", required=False) is None
    with pytest.raises(DataError, match=r"no val\.parquet"):
        read_table(tmp_path, "val")


def test_read_table_names_missing_columns_in_one_line(tmp_path: Path) -> None:
    pq.write_table(pa.table({"id": ["x"], "question": ["q"]}), tmp_path / "val.parquet")
    with pytest.raises(DataError) as info:
        read_table(tmp_path, "val", ["id", "solution", "image"])
    assert str(info.value) == f"{tmp_path / 'val.parquet'} lacks column(s) solution, image; it has id, question"


@pytest.mark.parametrize("damage", ["truncated", "empty", "not parquet"])
def test_a_damaged_parquet_is_a_one_line_data_error(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "train.parquet"
    write_table(path, _rows(20))
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "not parquet": b"id,question\n1,q\n"}[damage])
    for read in (lambda: read_table(tmp_path, "train"), lambda: split_rows(tmp_path, "train")):
        with pytest.raises(DataError) as info:
            read()
        message = str(info.value)
        assert message.startswith(f"cannot read {path} (") and message.endswith("); re-run the stage that wrote it")
        assert "\n" not in message and len(message) < len(str(path)) + 300  # the reason is cut, not a traceback
    with pytest.raises(DataError, match="re-run the stage that wrote it"):
        read_dataset(tmp_path, "train")


def test_read_dataset_decodes_images_and_knows_empty_splits(tmp_path: Path) -> None:
    write_table(tmp_path / "train.parquet", _rows(3))
    ds = read_dataset(tmp_path, "train", ["id", "image"], limit=2)
    assert isinstance(ds, datasets.Dataset) and len(ds) == 2 and ds.column_names == ["id", "image"]
    assert isinstance(ds.features["image"], datasets.Image) and ds[0]["image"].size == (6, 4)
    # A plain pyarrow file (image as a bytes/path struct, no `datasets` metadata) is cast to an Image too.
    plain = pa.table({"id": ["a"], "image": pa.array([{"bytes": _png(), "path": None}])})
    pq.write_table(plain, tmp_path / "test.parquet")
    assert isinstance(read_dataset(tmp_path, "test").features["image"], datasets.Image)

    write_table(tmp_path / "val.parquet", _rows(0))
    assert read_dataset(tmp_path, "val", required=False) is None
    with pytest.raises(DataError, match=r"the val split in .* has no rows; check the upstream stage's report"):
        read_dataset(tmp_path, "val")
    assert read_dataset(tmp_path / "nowhere", "val", required=False) is None


# ---------------------------------------------------------------------------------------------- writing
def test_write_table_replaces_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "sub" / "train.parquet"
    write_table(path, _rows(2))  # creates the folder
    write_table(path, _rows(3))
    assert pq.read_table(path).num_rows == 3 and [p.name for p in path.parent.iterdir()] == ["train.parquet"]

    def killed(table, where, **kwargs) -> None:
        Path(where).write_bytes(b"PAR1 half a file")
        raise KeyboardInterrupt  # a kill in the middle of the write

    monkeypatch.setattr(pq, "write_table", killed)
    with pytest.raises(KeyboardInterrupt):
        write_table(path, _rows(9))
    assert [p.name for p in path.parent.iterdir()] == ["train.parquet"]  # no temporary file left behind
    monkeypatch.undo()
    assert pq.read_table(path).num_rows == 3  # readers still see the whole previous file


def test_the_prepared_schema_carries_the_image_feature() -> None:
    features = datasets.Features.from_arrow_schema(arrow_schema())
    assert list(features) == ["id", "question", "solution", "image", "difficult", "year", "knowledge", "file_name"]
    assert isinstance(features["image"], datasets.Image)
    assert all(features[name] == datasets.Value("string") for name in features if name != "image")
