"""Stable splits: a row's split depends on its own content only, so growth never moves a row."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from mathwizard.data.splits import SPLIT_FILES, load_split, row_id, split_file, split_of
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


def test_split_file_and_load_split_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="unknown split 'dev'"):
        split_file(tmp_path, "dev")
    with pytest.raises(DataError, match="run `mathwizard prepare`"):
        load_split(tmp_path, "train")
    assert SPLIT_FILES == {
        "train": "train-00000-of-00001.parquet",
        "val": "val-00000-of-00001.parquet",
        "test": "test-00000-of-00001.parquet",
    }
