"""Stable train/val/test assignment and the prepared split files.

A row's split depends only on its own content hash, never on the other rows, their order or their number:
when MM_Math gains rows, re-running the split never moves an existing row, so scheduled retraining cannot
leak test problems into training.
"""

from __future__ import annotations

import hashlib
import json
import re
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
# The `datasets` features stored in the parquet metadata, so `load_dataset("parquet", ...)` decodes `image`.
_HF_FEATURES = {
    name: ({"_type": "Image"} if name == "image" else {"dtype": "string", "_type": "Value"}) for name in COLUMNS
}
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
    """The columns of every prepared split, with `datasets` metadata marking `image` as an Image feature."""
    import pyarrow as pa

    fields = [
        pa.field(name, pa.struct([("bytes", pa.binary()), ("path", pa.string())]) if name == "image" else pa.string())
        for name in COLUMNS
    ]
    metadata = {"huggingface": json.dumps({"info": {"features": _HF_FEATURES}})}
    return pa.schema(fields, metadata=metadata)


def split_file(folder: str | Path, split: str) -> Path:
    """The parquet file of `split` in a prepare stage folder.

    Raises:
        DataError: unknown split name, or the file is missing (the folder is not a finished prepare output).
    """
    if split not in SPLIT_FILES:
        raise DataError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    path = Path(folder) / SPLIT_FILES[split]  # type: ignore[index]
    if not path.is_file():
        raise DataError(f"{path} does not exist; run `mathwizard prepare` to create the {split} split")
    return path


def load_split(folder: str | Path, split: str) -> datasets.Dataset:
    """A prepared split as a `datasets.Dataset` with `image` decoded to PIL images on access."""
    import datasets
    import pyarrow.parquet as pq

    path = split_file(folder, split)
    schema = pq.read_schema(path)
    if pq.ParquetFile(path).metadata.num_rows == 0:  # a tiny dataset can leave val or test empty
        features = datasets.Features.from_arrow_schema(schema)
        return datasets.Dataset.from_dict({name: [] for name in features}, features=features, split=split)
    return datasets.load_dataset("parquet", data_files={split: str(path)}, split=split)
