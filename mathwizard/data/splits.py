"""The splits: which split a row belongs to, where a stage's split file lives, and how it is read and written.

Every stage reads and writes its train/val/test parquet files through this module, so one place decides where a
split is found (`split_path`), how a damaged file is reported (`read_table`: one line, not an Arrow traceback) and
how a file is replaced (`write_table`: a temporary file renamed into place, so a kill never leaves half a file).
prepare writes the Hub's shard names (`train-00000-of-00001.parquet`); the later stages write `<split>.parquet`.

A row's split depends only on its own content hash, never on the other rows, their order or their number:
when MM_Math gains rows, re-running the split never moves an existing row, so scheduled retraining cannot
leak test problems into training.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from mathwizard.config import SPLITS, SplitName
from mathwizard.errors import DataError

if TYPE_CHECKING:
    import datasets
    import pyarrow as pa

SPLIT_FILES: dict[SplitName, str] = {split: f"{split}-00000-of-00001.parquet" for split in SPLITS}
ID_HEX_CHARS = 16  # 64 bits: collisions are negligible for tens of thousands of rows
COLUMNS = ("id", "question", "solution", "image", "difficult", "year", "knowledge", "file_name")
_SPACES = re.compile(r"\s+")


def row_id(question: str, file_name: str, salt: str) -> str:
    """The row's identity: a hash of its question and figure.

    The solution and the metadata (year, difficulty, knowledge) are left out on purpose, so an upstream fix
    of a typo in a solution does not move the problem to another split. Whitespace is normalised for the same
    reason.
    """
    text = _SPACES.sub(" ", question).strip()
    digest = hashlib.sha256("\x1f".join((salt, text, file_name.strip())).encode("utf-8")).hexdigest()
    return digest[:ID_HEX_CHARS]


def split_of(row_id_hex: str, fractions: Sequence[float]) -> SplitName:
    """Map the id to [0, 1) and cut at the cumulative fractions (train, val, test)."""
    # 13 hex digits = 52 bits: exact in a float and always < 1.0 (64 bits can round up to 1.0).
    point = int(row_id_hex[:13], 16) / 16**13
    total = sum(fractions)  # validated to be 1 within 1e-6; dividing makes the last cut exactly 1.0
    cumulative = 0.0
    for split, fraction in zip(SPLITS, fractions, strict=True):
        cumulative += fraction
        if fraction > 0 and point < cumulative / total:
            return split
    return next(s for s, f in zip(reversed(SPLITS), reversed(fractions), strict=True) if f > 0)


def arrow_schema() -> pa.Schema:
    """The columns of every prepared split, with the `datasets` features in the metadata (`image` is an Image)."""
    import datasets

    string = datasets.Value("string")
    return datasets.Features({n: datasets.Image() if n == "image" else string for n in COLUMNS}).arrow_schema


def split_path(folder: str | Path, split: str) -> Path:
    """The parquet file of `split` in a stage folder: `<split>.parquet` or prepare's `<split>-00000-of-00001.parquet`.

    Raises:
        DataError: the folder holds neither.
    """
    folder = Path(folder)
    for candidate in (folder / f"{split}.parquet", *sorted(folder.glob(f"{split}-*.parquet"))):
        if candidate.is_file():
            return candidate
    raise DataError(
        f"{folder} has no {split}.parquet or {split}-00000-of-00001.parquet; pass a finished stage folder"
        " (run the stage that writes it first)"
    )


def split_rows(folder: str | Path, split: str, limit: int | None = None) -> int:
    """Rows in the split (at most `limit`), from the parquet footer alone."""
    import pyarrow.parquet as pq

    path = split_path(folder, split)
    try:
        rows = pq.ParquetFile(path).metadata.num_rows
    except (OSError, ValueError) as exc:
        raise _unreadable(path, exc) from None
    return rows if limit is None else min(rows, limit)


def read_table(
    folder: str | Path,
    split: str,
    columns: Sequence[str] | None = None,
    *,
    limit: int | None = None,
    required: bool = True,
) -> pa.Table | None:
    """The split's `columns` (all when None) as a pyarrow Table, first `limit` rows; images stay encoded.

    Returns None for a missing file when not `required`.

    Raises:
        DataError: the file is missing (when required), unreadable or truncated, or lacks a column.
    """
    import pyarrow.parquet as pq

    try:
        path = split_path(folder, split)
    except DataError:
        if required:
            raise
        return None
    try:
        available = pq.read_schema(path).names
        missing = [c for c in columns or () if c not in available]
        if missing:
            raise DataError(f"{path} lacks column(s) {', '.join(missing)}; it has {', '.join(available)}")
        table = pq.read_table(path, columns=list(columns) if columns is not None else None)
    except (OSError, ValueError) as exc:  # ArrowInvalid is a ValueError: a truncated or foreign file
        raise _unreadable(path, exc) from None
    return table.slice(0, limit) if limit is not None else table


def read_dataset(
    folder: str | Path,
    split: str,
    columns: Sequence[str] | None = None,
    *,
    limit: int | None = None,
    required: bool = True,
) -> datasets.Dataset | None:
    """The split as an in-memory `datasets.Dataset` (no copy in the datasets cache), `image` decoded on access.

    Returns None when the file is missing or empty and not `required`.

    Raises:
        DataError: as `read_table`, or the split is empty when `required`.
    """
    import datasets

    table = read_table(folder, split, columns, limit=limit, required=required)
    if table is None:
        return None
    if table.num_rows == 0:
        if required:
            raise DataError(f"the {split} split in {folder} has no rows; check the upstream stage's report")
        return None
    ds = datasets.Dataset(table)
    if "image" in ds.column_names and not isinstance(ds.features["image"], datasets.Image):
        ds = ds.cast_column("image", datasets.Image())
    return ds


def write_table(path: str | Path, table: pa.Table) -> None:
    """Write `table` to `path` through a temporary file and a rename: readers never see half a file."""
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _unreadable(path: Path, exc: Exception) -> DataError:
    reason = " ".join(str(exc).split())[:200]
    return DataError(f"cannot read {path} ({type(exc).__name__}: {reason}); re-run the stage that wrote it")
