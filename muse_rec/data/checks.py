"""Validation shared by every reader (loader, prepare, verify): one wording for each kind of bad input,
and one reading of nulls (a null ID is 0, 'missing'; a null list an empty sequence)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from muse_rec.data import schema
from muse_rec.data.layout import DatasetLayout
from muse_rec.errors import DataError


def open_parquet(path: Path) -> pq.ParquetFile:
    """Open a parquet file, turning a corrupt or truncated file into a DataError naming it."""
    try:
        return pq.ParquetFile(path)
    except FileNotFoundError:
        raise DataError(f"{path}: missing") from None
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable parquet file (corrupt or truncated?): {e}") from None


def check_columns(path: Path, found: pa.Schema, expected: pa.Schema) -> None:
    """Every expected column present with its exact Arrow type (extra columns are allowed)."""
    for field in expected:
        index = found.get_field_index(field.name)
        if index < 0:
            raise DataError(f"{path}: missing column {field.name!r} (expected {field.type}); found columns {found.names}")
        actual = found.field(index).type
        if not _same_type(actual, field.type):
            raise DataError(f"{path}: column {field.name!r} has type {actual}, expected {field.type}")


def _same_type(actual: pa.DataType, expected: pa.DataType) -> bool:
    """Equal types; list element names differ between writers ('item' vs 'element') and do not matter."""
    if pa.types.is_list(expected) or pa.types.is_large_list(expected):
        return type(actual) is type(expected) and _same_type(actual.value_type, expected.value_type)
    return actual == expected


def clicks_from_labels(labels: pa.ListArray, where: str, first_row: int = 0) -> np.ndarray:
    """The click (label element 1) of each row, after checking every label is a 2-element one-hot;
    an error names the row as `first_row` (the first row's number in `where`) + its index."""
    lengths = np.diff(labels.offsets.to_numpy(zero_copy_only=False))
    values = labels.values.to_numpy(zero_copy_only=False)
    bad_length = np.flatnonzero(lengths != 2)
    if len(bad_length) or labels.null_count:
        row = int(bad_length[0]) if len(bad_length) else int(np.flatnonzero(labels.is_null().to_numpy(zero_copy_only=False))[0])
        raise DataError(
            f"{where}, row {first_row + row}: column {schema.LABEL!r} must be a 2-element one-hot ([1, 0] or [0, 1]), "
            f"found {labels[row].as_py()}"
        )
    pairs = values[labels.offsets[0].as_py() :][: 2 * len(labels)].reshape(-1, 2)
    bad = np.flatnonzero((pairs.min(axis=1) != 0) | (pairs.max(axis=1) != 1) | (pairs.sum(axis=1) != 1))
    if len(bad):
        row = int(bad[0])
        raise DataError(
            f"{where}, row {first_row + row}: column {schema.LABEL!r} must be a 2-element one-hot ([1, 0] or [0, 1]), "
            f"found {pairs[row].tolist()}"
        )
    return pairs[:, 1].astype(np.float32)


def check_aligned(items: pa.ListArray, cates: pa.ListArray, where: str, first_row: int = 0) -> None:
    """Item and category sequences must have the same length in every row (rows named as in
    `clicks_from_labels`)."""
    item_lengths = np.diff(items.offsets.to_numpy(zero_copy_only=False))
    cate_lengths = np.diff(cates.offsets.to_numpy(zero_copy_only=False))
    bad = np.flatnonzero(item_lengths != cate_lengths)
    if len(bad):
        row = int(bad[0])
        raise DataError(
            f"{where}, row {first_row + row}: {schema.HIST_ITEMS!r} has {item_lengths[row]} behaviours but "
            f"{schema.HIST_CATES!r} has {cate_lengths[row]} (they must be aligned position by position)"
        )


def dense_list(column: pa.ListArray) -> pa.ListArray:
    """The list column with a null list read as empty (a missing sequence) and a null ID as 0 ('missing')."""
    values = column.flatten()
    if not column.null_count and not values.null_count:
        return column
    lengths = pc.fill_null(pc.list_value_length(column), 0).to_numpy()
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pc.fill_null(values, 0))


def check_total_rows(layout: DatasetLayout, split: str, footer_rows: int, num_shards: int) -> None:
    """metadata.json exists and its total_rows equals the footers' rows: only then is the split complete.

    Writers put metadata.json last, so its absence marks an interrupted run whose finished shards
    already carry their final names; a different count marks shards of another run.
    """
    path = layout.metadata_path(split)
    directory = layout.split_dir(split)
    if not path.exists():
        raise DataError(
            f"{directory}: metadata.json is missing but {num_shards} shard file(s) hold {footer_rows} rows; a split "
            "without it is incomplete (an interrupted prepare, synth or download?): re-run the command that wrote it"
        )
    total = layout.read_metadata(split)["total_rows"]
    if total != footer_rows:
        raise DataError(
            f"{path}: total_rows is {total} but the {num_shards} shard footers in {directory} hold {footer_rows} rows "
            "(shards missing, or mixed with another run's): re-run the command that wrote the split"
        )
